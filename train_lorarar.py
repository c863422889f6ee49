#!/usr/bin/env python
"""LoRA.rar merging-hypernetwork trainer.

    accelerate launch train_lorarar.py --config train_configs/toy_lorarar.yaml [key=value ...]
    python train_lorarar.py --config train_configs/toy_lorarar.yaml max_steps=50

The recipe lives in lorakit/training/lorarar.py; docs/lorarar.md describes every key.
"""

import sys

from lorakit.threads import configure_threads

configure_threads()  # before torch loads: lorakit's thread defaults (lorakit/threads.py), as `lorakit demo` and CI

from lorakit.training.entry import script  # noqa: E402

if __name__ == "__main__":
    sys.exit(script("lorarar"))
