"""One logging path for ``lorakit`` and ``train_*.py``: ``--quiet``, default, ``--verbose``.

By default the libraries' chatter that tells a user nothing (diffusers' "Loading pipeline components" bars and
"No LoRA keys associated to CLIPTextModel", transformers' "Loading weights" bars, peft's "Already found a
`peft_config`", deprecation notices) is off; ``--verbose`` (or ``LORAKIT_VERBOSITY=verbose``) shows it all;
``--quiet`` also hides lorakit's own progress and notes, leaving errors and the final result lines.
The choice travels in the environment, so processes started by ``accelerate launch`` follow it.
"""

from __future__ import annotations

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
    if current != "verbose":
        for key, value in _LIBRARY_ENV.items():
            os.environ.setdefault(key, value)
        for pattern in _UNINFORMATIVE:
            warnings.filterwarnings("ignore", message=pattern)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("lorakit").setLevel({"quiet": logging.WARNING, "normal": logging.INFO,
                                           "verbose": logging.DEBUG}[current])
    return current


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


def show_progress() -> bool:
    """Whether lorakit's own progress bars are shown (not under ``--quiet``)."""
    return level() != "quiet"


def tqdm(*args, disable: bool = False, **kwargs):
    """``tqdm.auto.tqdm``, hidden under ``--quiet`` (every lorakit progress bar goes through here)."""
    from tqdm.auto import tqdm as _tqdm

    return _tqdm(*args, disable=disable or not show_progress(), **kwargs)
