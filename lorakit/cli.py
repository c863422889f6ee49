"""The ``lorakit`` command line: one subcommand per stage (train, fuse, sample, eval, inspect, ...).

Each subcommand lives in ``lorakit/commands/<name>.py`` with ``add_parser(subparsers)`` and ``run(args)``;
modules import torch/diffusers inside ``run`` so ``lorakit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module) in the order ``--help`` lists them.
COMMANDS = [
    ("train", "lorakit.commands.train"),
    ("inspect", "lorakit.commands.inspect"),
    ("make-tiny", "lorakit.commands.make_tiny"),
    ("fuse", "lorakit.commands.fuse"),
    ("sample", "lorakit.commands.sample"),
    ("profile", "lorakit.commands.profile"),
    ("eval", "lorakit.commands.eval"),
    ("toyworld", "lorakit.commands.toyworld"),
    ("demo", "lorakit.commands.demo"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="Train, fuse, sample and evaluate LoRA adapters for Stable Diffusion (SD1.x/2.x, SDXL).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _, module in COMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lorakit.threads import configure_threads

    configure_threads()  # before any command loads torch: one thread unless OMP_NUM_THREADS is set (lorakit/threads.py)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse cannot take positionals after an option that follows another positional
        # (`lorakit train edlora --config X.yaml max_steps=10`): give key=value leftovers to commands that take them.
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        # Our errors name the bad input; show them without a traceback.
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
