"""Train a recipe in parts: each call trains up to a step, checkpoints, and the call that reaches ``max_steps``
keeps the adapter at its final path.

For machines where one recipe does not fit in one sitting (a shared job lock, a time limit). The run lives in a
work folder next to the final file, ``<dir>/.<stem>.partial``; every trainer of
:data:`lorakit.training.entry.TRAINERS` resumes bit-exactly (data order and RNG states restored, a schedule
that does not depend on where a run stops), so the adapter is the one an uninterrupted run gives. The finished
file is copied atomically to its final path and the work folder (lorakit's own, marked) is removed.

ED-LoRA runs of an earlier lorakit trained in ``<dir>/<stem>.work``: a run folder there is resumed in place and
kept when the run finishes (:func:`work_dir`), so no earlier progress is lost and nothing of it is deleted.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import shutil
from pathlib import Path

from lorakit.config import load_config
from lorakit.fileio import copy_file
from lorakit.outputs import is_marked
from lorakit.training import recipes
from lorakit.training.entry import TRAINERS
from lorakit.training.run_dir import checkpoints

# What every part adds to the recipe: where the run lives and how it resumes. None of these keys changes what a
# step computes (lorakit.training.run_dir.RESUMABLE_KEYS), so a run may be continued with another stop.
RUN_KEYS = ("checkpointing_steps=0", "save_every=0", "logging=none", "resume=latest")


def partial_dir(target: Path) -> Path:
    """``<dir>/.<stem>.partial``: the folder :func:`train_chunk` trains ``target`` in until it is done."""
    target = Path(target)
    return target.parent / f".{target.stem}.partial"


def legacy_work_dir(target: Path) -> Path:
    """``<dir>/<stem>.work``: where earlier toy ED-LoRA runs were trained."""
    return Path(target).with_suffix(".work")


def work_dir(target: Path) -> Path:
    """The run folder of ``target``: an earlier run's ``<stem>.work`` when one is there, else
    :func:`partial_dir`."""
    legacy = legacy_work_dir(target)
    return legacy if legacy.is_dir() else partial_dir(target)


def newest_checkpoint_step(work: Path) -> int:
    """The step of the newest complete checkpoint in the run folder ``work`` (0: none yet)."""
    found = checkpoints(work)
    return found[-1][0] if found else 0


def trained_step(target: Path) -> int:
    """The step an unfinished run of ``target`` has reached (0: not started)."""
    return newest_checkpoint_step(work_dir(target))


def resolve(trainer: str, recipe: str | os.PathLike | None, overrides: list[str]):
    """The recipe of ``trainer`` (a :data:`TRAINERS` name) resolved with ``overrides``."""
    return load_config(getattr(recipes, TRAINERS[trainer].schema), recipe, overrides)


def train_chunk(trainer: str, recipe: str | os.PathLike | None, overrides: list[str], target: str | os.PathLike,
                stop_at_step: int, latent_cache: str | os.PathLike | None = None) -> Path | None:
    """Train ``recipe`` (with ``overrides``) with ``trainer`` up to step ``stop_at_step`` (or its ``max_steps``,
    if fewer), continuing where an earlier call stopped.

    Args:
        trainer: ``blockwise``, ``edlora`` (any :data:`TRAINERS` name).
        recipe: the YAML recipe (None: the schema's defaults).
        overrides: ``key=value`` overrides that make the recipe (the caller hashes the same list into ``target``).
        target: the final adapter file; returned at once when it exists.
        stop_at_step: the step this call trains up to.
        latent_cache: ``data.cache_dir`` of the run (shared by the recipes of one cache folder).
    Returns:
        ``target`` once ``max_steps`` are done, else None (call again with a later stop).
    """
    target = Path(target)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = work_dir(target)
    run = [*overrides, f"output_dir={work}", *RUN_KEYS, f"stop_at_step={stop_at_step}"]
    if latent_cache is not None:
        run.append(f"data.cache_dir={latent_cache}")
    cfg = resolve(trainer, recipe, run)
    result, printed = train_captured(trainer, cfg)
    print(printed, end="", flush=True)
    if result.global_step < cfg.max_steps:
        return None
    copy_file(result.final_path, target)
    if work == partial_dir(target) and is_marked(work):  # the trainer's own folder: nothing in it is the user's
        shutil.rmtree(work)
    return target


def train_captured(trainer: str, cfg):
    """``train(cfg)`` of ``trainer`` with what it prints held back: ``(result, printed text)``; when it fails,
    what it printed so far is shown before the error."""
    train = importlib.import_module(TRAINERS[trainer].module).train
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            result = train(cfg)
    except BaseException:
        print(buf.getvalue(), end="", flush=True)
        raise
    return result, buf.getvalue()
