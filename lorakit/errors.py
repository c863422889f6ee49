"""The one error boundary of ``lorakit`` and ``train_*.py``: a user error becomes one line and exit status 2.

User errors are the exceptions lorakit raises for bad input (``ValueError`` and its subclasses such as
``ConfigError``/``OutputError``/``AdapterError``, missing files, permissions, undecodable text, config syntax).
Anything else is a bug: it prints one line too, says so, and exits 1. ``--debug`` or ``LORAKIT_DEBUG=1`` shows
the traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from lorakit.logs import take_flags


class InsufficientMemory(ValueError):
    """A stage's memory estimate exceeds the free memory; the message is one line with the numbers and the override."""


def _user_error_types() -> tuple[type, ...]:
    types: list[type] = [ValueError, OSError, LookupError]  # OSError: missing/unreadable/unwritable paths
    try:
        import yaml

        types.append(yaml.YAMLError)
    except ImportError:
        pass
    try:
        from omegaconf.errors import OmegaConfBaseException

        types.append(OmegaConfBaseException)
    except ImportError:
        pass
    return tuple(types)


def debug_enabled(argv: list[str] | None = None) -> bool:
    """``--debug`` among the arguments or ``LORAKIT_DEBUG`` set to something other than 0/empty."""
    flag = os.environ.get("LORAKIT_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    return flag or "--debug" in (argv or [])


def one_line(err: BaseException) -> str:
    """The exception's message on one line (newlines folded, never empty)."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    if isinstance(err, KeyError) and text.startswith("'") and text.endswith("'"):
        text = f"missing key {text}"
    return text or type(err).__name__


def run_guarded(fn: Callable[[], int | None], prog: str, debug: bool = False) -> int:
    """Call ``fn``; turn an exception into one line on stderr. Returns the exit status (0, 1, 2 or 130)."""
    if debug:
        return int(fn() or 0)
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except _user_error_types() as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the boundary: anything else is a bug, still one line
        print(f"{prog}: internal error ({type(err).__name__}): {one_line(err)} "
              "(run again with --debug or LORAKIT_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return 1


def script_main(main: Callable[[list[str]], int | None], prog: str) -> int:
    """Entry point of ``train_*.py``: ``main(argv)`` inside :func:`run_guarded`, ``--debug`` taken out of argv."""
    argv = sys.argv[1:]
    debug = debug_enabled(argv)
    argv = take_flags([a for a in argv if a != "--debug"])  # --quiet / --verbose
    return run_guarded(lambda: main(argv), prog, debug)


__all__ = ["run_guarded", "script_main", "debug_enabled", "one_line"]
