"""The trainers' command lines (``train_*.py`` and ``lorakit train``): a recipe's arguments are parsed without
torch, so ``--help`` answers at once and lists every recipe key with its default; training starts after."""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass

from lorakit.config import load_config, schema_defaults
from lorakit.errors import script_main
from lorakit.training import recipes
from lorakit.training.key_help import key_help


@dataclass(frozen=True)
class Trainer:
    module: str  # has ``train(cfg)``
    schema: str  # dataclass in lorakit.training.recipes
    description: str
    example: str
    doc: str  # the docs page that explains its keys
    hidden: tuple[str, ...] = ()  # key prefixes the trainer does not read


TRAINERS = {
    "blockwise": Trainer("lorakit.training.blockwise", "BlockwiseConfig",
                         "Train a block-wise LoRA / LoCon adapter (per-block rank; 0 skips a block).",
                         "max_steps=100 network.blocks=upper", "docs/training.md"),
    "edlora": Trainer("lorakit.training.edlora", "EDLoRAConfig",
                      "Train an ED-LoRA (Mix-of-Show) concept: layer-wise embeddings + LoRA.",
                      "max_steps=100 concept.init_word=cat", "docs/edlora.md"),
    "lorarar": Trainer("lorakit.training.lorarar", "LoraRarConfig",
                       "Train the LoRA.rar merging hypernetwork over content/style LoRA pairs.",
                       "max_steps=50 synthetic.content=3", "docs/lorarar.md",
                       hidden=("data.", "text_encoder_lr", "sample_")),
}


def build_parser(name: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of trainer ``name`` (blockwise, edlora, lorarar)."""
    trainer = TRAINERS[name]
    keys = [(k, v) for k, v in schema_defaults(getattr(recipes, trainer.schema))
            if not k.startswith(trainer.hidden or ("\0",))]
    shown = [(k, repr(v)) for k, v in keys]
    width, dwidth = max(len(k) for k, _ in shown), min(24, max(len(d) for _, d in shown))
    listing = "\n".join(f"  {k:<{width}}  {d:<{dwidth}}  {key_help(name, k)}" for k, d in shown)
    parser = argparse.ArgumentParser(
        prog=prog or f"train_{name}.py",
        description=f"{trainer.description}\nRuns under `accelerate launch` for several GPUs or processes; "
        f"{trainer.doc} explains every key.",
        epilog=f"recipe keys (default, meaning):\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="a YAML recipe (train_configs/*.yaml); keys not given keep their default "
                        "(default: none, every key at its default)")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {trainer.example} (default: none)")
    return parser


def main(name: str, argv: list[str] | None = None) -> int:
    """Parse ``--config X.yaml key=value ...`` for trainer ``name``, then train. Returns the exit status."""
    args = build_parser(name).parse_args(argv)
    trainer = TRAINERS[name]
    cfg = load_config(getattr(recipes, trainer.schema), args.config, args.overrides)
    importlib.import_module(trainer.module).train(cfg)
    return 0


def script(name: str) -> int:
    """Entry point of ``train_<name>.py``: :func:`main` inside the one error boundary (``--debug``, ``--quiet``,
    ``--verbose`` accepted anywhere)."""
    return script_main(lambda argv: main(name, argv), f"train_{name}.py")
