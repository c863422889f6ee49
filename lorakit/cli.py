"""The ``lorakit`` command line: one subcommand per stage (train, fuse, sample, eval, inspect, ...).

Each subcommand lives in ``lorakit/commands/<name>.py`` with its ``HELP`` line, ``DESCRIPTION``,
``add_arguments(parser)`` and ``run(args)`` (and ``PARSER_OPTIONS``, more ``add_parser`` arguments, where it needs
them); modules import torch/diffusers inside ``run`` so ``lorakit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lorakit import logs
from lorakit.errors import debug_enabled, run_guarded
from lorakit.threads import configure_threads

# (subcommand, module) in the order ``--help`` lists them.
COMMANDS = [
    ("train", "lorakit.commands.train"),
    ("inspect", "lorakit.commands.inspect"),
    ("convert", "lorakit.commands.convert"),
    ("make-tiny", "lorakit.commands.make_tiny"),
    ("fuse", "lorakit.commands.fuse"),
    ("sample", "lorakit.commands.sample"),
    ("profile", "lorakit.commands.profile"),
    ("eval", "lorakit.commands.eval"),
    ("toyworld", "lorakit.commands.toyworld"),
    ("demo", "lorakit.commands.demo"),
]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's help ends with its default unless the text already gives it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not action.option_strings or "default" in text.lower() or "required" in text.lower():
            return text
        if action.required:
            return f"{text} (required)".strip()
        # identity, not ==: 0 and 0.0 compare equal to False but are real defaults to show
        if any(default is v for v in (False, argparse.SUPPRESS)) or action.nargs == 0:
            return text  # a flag: off unless given
        if default is None or default == "" or default == []:
            return f"{text} (default: none)".strip()
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        if f"({shown})" in text:
            return text
        return f"{text} (default: {shown})".strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="Train, fuse, sample and evaluate LoRA adapters for Stable Diffusion (SD1.x/2.x, SDXL).",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also LORAKIT_DEBUG=1)")
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' notices and loading bars too (also LORAKIT_VERBOSITY=verbose)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars or notes, only errors and results (also LORAKIT_VERBOSITY=quiet)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS:
        command = importlib.import_module(module)
        p = sub.add_parser(name, help=command.HELP, description=command.DESCRIPTION,
                           **getattr(command, "PARSER_OPTIONS", {}))
        if hasattr(command, "run"):
            p.set_defaults(func=command.run)
        command.add_arguments(p)
    _use_formatter(sub)
    return parser


def _use_formatter(sub: argparse._SubParsersAction) -> None:
    """Give every subcommand parser, nested ones too (``toyworld render``), the HelpFormatter."""
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _use_formatter(action)


def main(argv: list[str] | None = None) -> int:
    configure_threads()  # before any command loads torch: one thread unless OMP_NUM_THREADS is set

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere, also after the subcommand
    previous = os.environ.get(logs.ENV)
    try:
        return _run(logs.take_flags(argv), debug)  # --quiet / --verbose are accepted anywhere too
    finally:  # a Python caller's environment is left as it was
        if previous is None:
            os.environ.pop(logs.ENV, None)
        else:
            os.environ[logs.ENV] = previous


def _run(argv: list[str], debug: bool) -> int:
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
    # One error boundary: a user error is one line naming the bad input, exit status 2 (argparse's own).
    return run_guarded(lambda: args.func(args), f"lorakit {args.command}", debug)


if __name__ == "__main__":
    sys.exit(main())
