"""CPU thread defaults of every lorakit entry point (``lorakit`` commands, ``train_*.py``, tools, tests).

One torch thread unless the user sets ``OMP_NUM_THREADS`` (or passes an explicit count, e.g. ``--threads``), and
OpenMP's passive waiting. Why: on the toy models one thread is as fast as two on an idle 2-core CPU and several
times faster on a busy one (busy-waiting OpenMP threads stall whenever another process holds a core); and the
thread count changes the order of float reductions, hence the bits of a trained LoRA, so a recipe gives the same
weights from the tour, the demo and CI only under the same count. On a GPU the CPU thread count hardly matters.

Torch reads both variables when it is first imported, so :func:`configure_threads` is called before that where
the entry point allows (``lorakit`` and ``train_*.py`` call it first thing); when torch is already loaded the
thread count is still applied with ``torch.set_num_threads``. This module imports nothing heavy.
"""

from __future__ import annotations

import os
import sys

DEFAULT_THREADS = 1


def configure_threads(threads: int | None = None) -> int:
    """Apply lorakit's thread defaults to this process and the processes it starts.

    Args:
        threads: an explicit torch thread count (wins over everything); None: ``OMP_NUM_THREADS`` when the user
            set it, else :data:`DEFAULT_THREADS`.
    Returns:
        The thread count in effect.
    Raises:
        ValueError if ``threads`` < 1 (an ``OMP_NUM_THREADS`` that is not a positive integer is replaced by the
        default, with a warning).
    """
    if threads is None:
        raw = os.environ.get("OMP_NUM_THREADS", "").strip()
        threads = int(raw) if raw.isdigit() and int(raw) > 0 else DEFAULT_THREADS
        if raw and str(threads) != raw:
            import warnings

            warnings.warn(f"OMP_NUM_THREADS={raw!r} is not a positive integer; using {threads} thread(s)", stacklevel=2)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # only read when torch loads; the user's value wins
    os.environ["OMP_NUM_THREADS"] = str(threads)  # torch (when it loads) and child processes follow it
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return threads


__all__ = ["configure_threads", "DEFAULT_THREADS"]
