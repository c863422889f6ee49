"""One logging path for ``lorakit`` and ``train_*.py``: ``--quiet``, default, ``--verbose``.

By default the libraries' chatter that tells a user nothing (diffusers' "Loading pipeline components" bars and
"No LoRA keys associated to CLIPTextModel", transformers' "Loading weights" bars, peft's "Already found a
`peft_config`", deprecation notices) is off; ``--verbose`` (or ``LORAKIT_VERBOSITY=verbose``) shows it all;
``--quiet`` also hides lorakit's own progress and notes, leaving errors, warnings and the final result lines.
The choice travels in the environment, so processes started by ``accelerate launch`` follow it.

Where each kind of message goes:

- results (what a command made or measured): ``print`` to stdout in ``lorakit/commands`` and the trainers'
  summary, always shown;
- notes (what lorakit is doing: a cache reused, a checkpoint resumed): :func:`note`, stdout, not under ``--quiet``;
- warnings (something the user may want to change): :func:`warn` (``warnings.warn`` of a :class:`LorakitWarning`,
  so Python callers can filter them and tests can catch them); the command line shows each as one ``lorakit: warning: ...`` line on stderr;
- errors: an exception, turned into one line and exit status 2 by :func:`lorakit.errors.run_guarded`;
- progress bars: :func:`tqdm`, not under ``--quiet``.

Notes and warnings are written by the main process only (``RANK`` 0 under ``accelerate launch``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

LEVELS = ("quiet", "normal", "verbose")
ENV = "LORAKIT_VERBOSITY"

# Library settings read from the environment when the library is first imported (set before torch loads).
_LIBRARY_ENV = {
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
_SET_HERE: set[str] = set()  # the keys of _LIBRARY_ENV that configure() put into the environment
# Python warnings from the libraries that say nothing a lorakit user can act on.
_UNINFORMATIVE = (
    r"Already found a `peft_config` attribute",
    r".*torchvision.*",
    r"No LoRA keys associated",
    r".*modules in .* that should be kept in float32.*",
)


def level() -> str:
    """The verbosity in force: ``LORAKIT_VERBOSITY`` if valid, else ``normal``."""
    value = os.environ.get(ENV, "normal").strip().lower()
    return value if value in LEVELS else "normal"


def take_flags(argv: list[str]) -> list[str]:
    """Apply ``--quiet`` / ``--verbose`` (accepted anywhere in ``argv``, the last one wins) and return ``argv``
    without them."""
    chosen = None
    for arg in argv:
        if arg in ("--quiet", "--verbose"):
            chosen = arg[2:]
    configure(chosen)
    return [a for a in argv if a not in ("--quiet", "--verbose")]


def configure(chosen: str | None = None) -> str:
    """Set the verbosity (``None``: keep the environment's) and apply it to the libraries. Returns it."""
    if chosen is not None:
        if chosen not in LEVELS:
            raise ValueError(f"verbosity must be one of {LEVELS}, got {chosen!r}")
        os.environ[ENV] = chosen
    current = level()
    if current == "verbose":  # undo what an earlier configure() set (a user's own setting stays)
        for key in _SET_HERE & set(os.environ):
            if os.environ[key] == _LIBRARY_ENV[key]:
                del os.environ[key]
        _SET_HERE.clear()
    else:
        for key, value in _LIBRARY_ENV.items():
            if key not in os.environ:
                os.environ[key] = value
                _SET_HERE.add(key)
        for pattern in _UNINFORMATIVE:
            warnings.filterwarnings("ignore", message=pattern)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    if warnings.formatwarning is not _format_warning:
        _format_warning.previous = warnings.formatwarning
        warnings.formatwarning = _format_warning
    logging.getLogger("lorakit").setLevel({"quiet": logging.WARNING, "normal": logging.INFO,
                                           "verbose": logging.DEBUG}[current])
    return current


@contextlib.contextmanager
def library_notices_off():
    """Inside, the libraries' Python warnings that tell a lorakit user nothing (``_UNINFORMATIVE``) are dropped
    unless the verbosity is ``verbose``; the warnings filters are restored on leaving. For library calls that
    warn by design whatever the caller does, so Python callers of lorakit (and the tests) stay quiet too, not
    only the command line: peft says "Already found a `peft_config` attribute" for every adapter injected into a
    model that already holds one, and loading several adapters into one pipeline is what sampling, eval and
    fusion do."""
    with warnings.catch_warnings():
        if level() != "verbose":
            for pattern in _UNINFORMATIVE:
                warnings.filterwarnings("ignore", message=pattern)
        yield


def main_process() -> bool:
    """Whether this is the main process (``RANK`` unset or 0, as ``accelerate launch`` / torchrun set it)."""
    return os.environ.get("RANK", "0") == "0"


def note(message: str) -> None:
    """A note on what lorakit is doing: stdout, main process only, hidden under ``--quiet``."""
    if level() != "quiet" and main_process():
        print(message, flush=True)


class LorakitWarning(UserWarning):
    """A warning of lorakit's own: something the user may want to change."""


def warn(message: str, stacklevel: int = 1) -> None:
    """A :class:`LorakitWarning` (one line on stderr from the command line), main process only. ``stacklevel`` 1
    names the caller's line, as ``warnings.warn``'s 2 does."""
    if main_process():
        warnings.warn(message, LorakitWarning, stacklevel=stacklevel + 1)


def _format_warning(message, category, filename, lineno, line=None):
    """lorakit's own warnings as one line; anything else (shown only under ``--verbose``) as Python shows it.
    (Formatting, not showing, is replaced: ``warnings.catch_warnings(record=True)`` and ``pytest.warns`` still
    record them.)"""
    if issubclass(category, LorakitWarning):
        return f"lorakit: warning: {message}\n"
    return _format_warning.previous(message, category, filename, lineno, line)


_format_warning.previous = warnings.formatwarning


def quiet_loaded_libraries() -> None:
    """Turn off the progress bars diffusers / transformers show while loading (they ignore the environment)
    unless the verbosity is ``verbose``. Call after importing diffusers."""
    if level() == "verbose":
        return
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


@contextlib.contextmanager
def library_chatter_off():
    """Silence diffusers/transformers/peft loading chatter (progress bars, LoRA-key notes, deprecations) so a
    command's own progress bar stays readable; restores the libraries' settings afterwards."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = (dlog.get_verbosity(), tlog.get_verbosity())
    bars = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


def show_progress() -> bool:
    """Whether lorakit's own progress bars are shown (not under ``--quiet``)."""
    return level() != "quiet"


def tqdm(*args, disable: bool = False, **kwargs):
    """``tqdm.auto.tqdm``, hidden under ``--quiet`` (every lorakit progress bar goes through here)."""
    from tqdm.auto import tqdm as _tqdm

    return _tqdm(*args, disable=disable or not show_progress(), **kwargs)
