"""``lorakit train RECIPE --config X.yaml [key=value ...]``: run a trainer in this one process.

For several GPUs use ``accelerate launch train_<recipe>.py ...`` (same arguments).
"""

from __future__ import annotations

import argparse

from lorakit.training.entry import TRAINERS


class _TrainerHelp(argparse.Action):
    """``-h``: after a trainer's name, that trainer's help (every recipe key, its default and meaning); before
    it, the help of ``lorakit train``."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from lorakit.training.entry import build_parser

        recipe = getattr(namespace, "recipe", None)
        (build_parser(recipe, prog=f"lorakit train {recipe}") if recipe in TRAINERS else parser).print_help()
        parser.exit()


HELP = "train an adapter in one process (blockwise LoRA/LoCon, edlora, lorarar)"
DESCRIPTION = (
    "Train with a YAML recipe plus key=value overrides, in one process. "
    "Multi-GPU: accelerate launch train_<recipe>.py --config ... (same arguments). "
    "Example: lorakit train blockwise --config train_configs/toy_character.yaml max_steps=200. "
    "Every recipe key with its default and meaning: lorakit train RECIPE --help"
)
PARSER_OPTIONS = {"add_help": False}  # -h is _TrainerHelp: after RECIPE it lists that trainer's keys


def add_arguments(p) -> None:
    p.add_argument("-h", "--help", action=_TrainerHelp,
                   help="show this help (after RECIPE: that trainer's keys, defaults and meanings) and exit")
    p.add_argument("recipe", choices=sorted(TRAINERS), help="which trainer")
    p.add_argument("--config", help="YAML recipe file (train_configs/*.yaml) (default: none, every key at its default)")
    p.add_argument("overrides", nargs="*", help="key=value overrides (base_model=..., data.path=..., max_steps=...) (default: none)")


def run(args) -> int:
    from lorakit.training.entry import main

    argv = (["--config", args.config] if args.config else []) + list(args.overrides)
    return main(args.recipe, argv)
