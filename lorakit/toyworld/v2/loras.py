"""Train toy world v2 identity LoRAs from their recipes (``train_configs/toy2_<identity>.yaml``), cached by hash.

A recipe names its data as ``data/toy2/<identity>`` (whole-scene captions) and ``data/toy2/class``
(regularisation images of the class world). Those folders are not shipped: :func:`ensure_data` renders them
(deterministically: same arguments, same bytes) under the LoRA cache, and the recipe hash covers their bytes,
as for v1 (:mod:`lorakit.toyworld.loras`).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from lorakit.resources import BUNDLED
from lorakit.toyworld.loras import (
    recipe_config,
    recipe_lora_path,
    train_recipe_lora,
    train_recipe_lora_chunk,
    tree_hash,
)
from lorakit.toyworld.v2.concepts import IDENTITIES, get_concept
from lorakit.toyworld.v2.dataset import CLASS_WORLD, make_dataset

# Images per folder and the seed each is rendered with (the recipes' comments say the same).
DATA_N = 40
DATA_SEED = 0
REG_N = 40
REG_SEED = 1


def identity_name(concept: str) -> str:
    """``concept`` if it is a v2 identity (``kwibbit``), else a ValueError naming the identities."""
    c = get_concept(concept)
    if c.role != "identity":
        raise ValueError(f"{concept!r} is a v2 {c.role} concept; v2 LoRAs are made for the identities: "
                         f"{', '.join(i.name for i in IDENTITIES)}")
    return c.name


def bundled_recipe(stem: str, what: str) -> Path:
    """``train_configs/<stem>.yaml`` (through the bundled recipes folder); ``what`` names it in the error."""
    path = BUNDLED / "recipes" / f"{stem}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no toy world v2 {what}: expected {path}")
    return path


def recipe_path(identity: str) -> Path:
    """``train_configs/toy2_<identity>.yaml``."""
    return bundled_recipe(f"toy2_{identity_name(identity)}", f"recipe for {identity!r}")


def ensure_data(identity: str, root: str | os.PathLike) -> tuple[Path, Path]:
    """The identity's dataset and the regularisation folder under ``root`` (``<identity>-n40-s0``,
    ``class-n40-s1``). Each is rendered under a temporary name (40 renders, under a second) and renamed into place
    unless the folder there already has exactly those files, so a half-written folder is never used and a folder
    an older lorakit rendered differently is replaced rather than trained on.

    Raises:
        ValueError: a folder to replace holds files lorakit does not write (``NNNNN.png`` / ``.txt``).
    """
    root = Path(root)
    out = []
    for name, n, seed in ((identity_name(identity), DATA_N, DATA_SEED), (CLASS_WORLD, REG_N, REG_SEED)):
        out.append(ensure_rendered(root / f"{name}-n{n}-s{seed}",
                                   lambda tmp, name=name, n=n, seed=seed: make_dataset(name, tmp, n, seed)))
    return out[0], out[1]


def ensure_rendered(folder: Path, write) -> Path:
    """``folder`` holding what ``write(tmp_folder)`` renders: rendered under a temporary name and renamed into place
    unless ``folder`` already has exactly those files (checked once per process), as :func:`ensure_data` does.

    Raises:
        ValueError: a folder to replace holds files lorakit does not write (``NNNNN.png`` / ``.txt``).
    """
    if folder.resolve() not in _CHECKED:  # once per process: bench and demo ask for every identity's path
        tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
        write(tmp)
        if folder.is_dir() and tree_hash(folder) == tree_hash(tmp):
            shutil.rmtree(tmp)
        else:
            _put_in_place(tmp, folder)
        _CHECKED.add(folder.resolve())
    return folder


_CHECKED: set[Path] = set()  # folders this process rendered or found equal to its render


def _put_in_place(tmp: Path, folder: Path) -> None:
    """Rename the fresh render ``tmp`` to ``folder``, moving a stale ``folder`` (lorakit's own files only) aside and
    removing it after."""
    stale = None
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if not re.fullmatch(r"\d{5}\.(png|txt)", p.name))
        if foreign:
            shutil.rmtree(tmp)
            raise ValueError(f"{folder}: differs from this lorakit's render and holds files lorakit does not write "
                             f"({foreign[0]}); move that folder away and run again")
        stale = folder.with_name(f".{folder.name}.stale{os.getpid()}")
        try:
            os.replace(folder, stale)
        except FileNotFoundError:  # another process moved it first
            stale = None
    try:
        os.replace(tmp, folder)
    except OSError:  # another process renamed its copy first: the same render of the same seed
        if not folder.is_dir():
            raise
        shutil.rmtree(tmp)
    if stale is not None:
        shutil.rmtree(stale)


def check_base(base: str | os.PathLike) -> None:
    """FileNotFoundError unless ``base`` is a folder (or a ``tiny:`` / ``random:`` model name)."""
    if not Path(base).exists() and not str(base).startswith(("tiny:", "random:")):
        raise FileNotFoundError(f"toy world v2 base not found: {base} (a v2 pipeline folder, e.g. one of "
                                f"<work>/unet/toy-unet-stepNNNNNN written by tools/train_toy_base_v2.py)")


def _overrides(identity: str, base: str | os.PathLike, out_dir: Path, overrides: list[str] | None) -> list[str]:
    check_base(base)
    data, reg = ensure_data(identity, out_dir / "toy2-data")
    return [f"base_model={base}", f"data.path={data}", f"data.reg_path={reg}", *(overrides or [])]


def lora_path(identity: str, out_dir: str | os.PathLike, base: str | os.PathLike,
              overrides: list[str] | None = None) -> Path:
    """Where :func:`train_identity_lora` keeps this identity's LoRA (``out_dir/toy2_<identity>-<hash>
    .safetensors``)."""
    name = identity_name(identity)
    return recipe_lora_path(recipe_path(name), f"toy2_{name}", out_dir,
                            _overrides(name, base, Path(out_dir), overrides))


def train_identity_lora(identity: str, out_dir: str | os.PathLike, base: str | os.PathLike,
                        overrides: list[str] | None = None, force: bool = False) -> Path:
    """Train (or reuse) the v2 LoRA of ``identity`` on the v2 pipeline ``base``.

    Args:
        identity: a v2 identity (``kwibbit``, ``zorbo``, ...).
        out_dir: LoRA cache folder; its data goes to ``out_dir/toy2-data``.
        base: a v2 pipeline folder (the bundled one: ``lorakit.toyworld.v2.models.DEFAULT_BASE``).
        overrides: extra ``key=value`` recipe overrides (``["max_steps=100"]``).
        force: retrain even when the LoRA with this hash exists.
    Returns:
        The adapter file (kohya keys; ``lorakit.trigger`` = the identity in its metadata).
    """
    name = identity_name(identity)
    return train_recipe_lora(recipe_path(name), f"toy2_{name}", out_dir,
                             _overrides(name, base, Path(out_dir), overrides), force)


def train_identity_lora_chunk(identity: str, out_dir: str | os.PathLike, base: str | os.PathLike,
                              stop_at_step: int, overrides: list[str] | None = None) -> Path | None:
    """:func:`train_identity_lora` in parts: train up to ``stop_at_step``, continuing an earlier call's run;
    the LoRA (the same file, bit for bit) once the recipe's ``max_steps`` are done, else None."""
    name = identity_name(identity)
    return train_recipe_lora_chunk(recipe_path(name), f"toy2_{name}", out_dir,
                                   _overrides(name, base, Path(out_dir), overrides), stop_at_step)


def max_steps(identity: str, out_dir: str | os.PathLike, base: str | os.PathLike,
              overrides: list[str] | None = None) -> int:
    """The recipe's ``max_steps`` (with ``overrides``)."""
    name = identity_name(identity)
    return recipe_config(recipe_path(name), _overrides(name, base, Path(out_dir), overrides)).max_steps
