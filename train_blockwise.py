#!/usr/bin/env python
"""Block-wise LoRA / LoCon trainer.

    accelerate launch train_blockwise.py --config train_configs/toy_character.yaml [key=value ...]
    python train_blockwise.py --config train_configs/toy_style_upper.yaml max_steps=100

The recipe lives in lorakit/training/blockwise.py; docs/training.md lists every key.
"""

import sys

from lorakit.threads import configure_threads

configure_threads()  # before torch loads: lorakit's thread defaults (lorakit/threads.py), as `lorakit demo` and CI

from lorakit.training.entry import script  # noqa: E402

if __name__ == "__main__":
    sys.exit(script("blockwise"))
