"""``lorakit train RECIPE --config X.yaml [key=value ...]``: run a trainer in this one process.

For several GPUs use ``accelerate launch train_<recipe>.py ...`` (same arguments).
"""

from __future__ import annotations

import importlib

# recipe -> module with ``main(argv) -> int`` (argv: ``--config X.yaml key=value ...``).
TRAINERS = {
    "blockwise": "lorakit.training.blockwise",
    "edlora": "lorakit.training.edlora",
    "lorarar": "lorakit.training.lorarar",
}


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
    try:
        module = importlib.import_module(TRAINERS[args.recipe])
    except ModuleNotFoundError as err:
        raise ValueError(f"trainer {args.recipe!r} is not available in this install ({err})") from err
    argv = (["--config", args.config] if args.config else []) + list(args.overrides)
    return int(module.main(argv) or 0)
