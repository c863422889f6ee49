#!/usr/bin/env python
"""ED-LoRA (Mix-of-Show) trainer.

    accelerate launch train_edlora.py --config train_configs/toy_edlora_character.yaml [key=value ...]
    python train_edlora.py --config train_configs/sd15_edlora_character.yaml data.path=my_cat concept.init_word=cat

The recipe lives in lorakit/training/edlora.py; docs/edlora.md describes the data folder and every key.
"""

import sys

from lorakit.training.entry import script

if __name__ == "__main__":
    sys.exit(script("edlora"))
