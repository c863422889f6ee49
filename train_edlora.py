#!/usr/bin/env python
"""ED-LoRA (Mix-of-Show) trainer.

    accelerate launch train_edlora.py --config train_configs/toy_edlora_character.yaml [key=value ...]
    python train_edlora.py --config train_configs/sd15_edlora_character.yaml data.path=my_cat concept.init_word=cat

The recipe lives in lorakit/training/edlora.py; docs/edlora.md describes the data folder and every key.
"""

import sys

from lorakit.threads import configure_threads

configure_threads()  # before torch loads: lorakit's thread defaults (lorakit/threads.py), as `lorakit demo` and CI

from lorakit.training.entry import script  # noqa: E402

if __name__ == "__main__":
    sys.exit(script("edlora"))
