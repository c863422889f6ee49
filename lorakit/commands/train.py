"""``lorakit train RECIPE --config X.yaml [key=value ...]``: run a trainer in this one process.

For several GPUs use ``accelerate launch train_<recipe>.py ...`` (same arguments).
"""

from __future__ import annotations

from lorakit.training.entry import TRAINERS


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train an adapter in one process (blockwise LoRA/LoCon, edlora, lorarar)",
        description="Train with a YAML recipe plus key=value overrides, in one process. "
        "Multi-GPU: accelerate launch train_<recipe>.py --config ... (same arguments). "
        "Example: lorakit train blockwise --config train_configs/toy_character.yaml max_steps=200",
    )
    p.add_argument("recipe", choices=sorted(TRAINERS), help="which trainer")
    p.add_argument("--config", help="YAML recipe file (train_configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides (base_model=..., data.path=..., max_steps=...)")
    p.set_defaults(func=run)


def run(args) -> int:
    from lorakit.training.entry import main

    argv = (["--config", args.config] if args.config else []) + list(args.overrides)
    return main(args.recipe, argv)
