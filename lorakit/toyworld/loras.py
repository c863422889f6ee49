"""Train the toy world's held-out concept LoRAs from their recipes, cached by recipe hash.

``lorakit demo``, ``.ci/run`` and the benchmarks all need the same small LoRAs (one per held-out concept,
``train_configs/toy_<concept>.yaml``). A LoRA is retrained only when something that determines it changes:
the resolved recipe (after overrides), the base model's weights, or the concept's training images.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lorakit.config import load_config
from lorakit.fileio import copy_file
from lorakit.resources import data_path, toy_recipe
from lorakit.toyworld.concepts import get_concept
from lorakit.training.blockwise import BlockwiseConfig
from lorakit.training.chunked import (  # noqa: F401 - partial_dir, newest_checkpoint_step: importable from here
    newest_checkpoint_step,
    partial_dir,
    resolve,
    train_captured,
    train_chunk,
    trained_step,
)


def recipe_path(concept: str) -> Path:
    """``train_configs/toy_<concept>.yaml`` for a held-out concept name (or its trigger word)."""
    c = get_concept(concept)
    path = toy_recipe(c.name)
    if not path.exists():
        raise FileNotFoundError(f"no toy recipe for concept {c.name!r}: expected {path}")
    return path


def _hash_files(h, root: Path) -> None:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(root) if f != root else f.name).encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())


def tree_hash(root: Path) -> str:
    """SHA-256 over the relative names and bytes of the files under ``root`` (or of one file)."""
    h = hashlib.sha256()
    _hash_files(h, Path(root))
    return h.hexdigest()


# Keys that say where and how a run writes, not what it learns: left out of every hash.
RUN_ONLY_KEYS = ("output_dir", "output_name", "logging", "checkpoint_at_end", "checkpointing_steps", "save_every",
                 "overwrite", "memory_check", "resume")


def content_hash(resolved: dict, base: Path, data: Path | None = None) -> str:
    """16 hex digits of SHA-256 over a resolved config dict, the base's UNet / text-encoder / VAE weights (those
    that exist) and the files under ``data`` (if given and present)."""
    h = hashlib.sha256(repr(sorted(resolved.items())).encode())
    for part in ("unet", "text_encoder", "vae"):
        if (base / part).exists():
            _hash_files(h, base / part)
    if data is not None and data.exists():
        _hash_files(h, data)
    return h.hexdigest()[:16]


def recipe_hash(cfg) -> str:
    """Hash of what determines a trained LoRA: resolved config (minus output location), base weights, data."""
    from omegaconf import OmegaConf

    resolved = OmegaConf.to_container(cfg, resolve=True)
    for key in RUN_ONLY_KEYS:
        resolved.pop(key, None)
    resolved["data"].pop("cache_dir", None)
    if resolved.get("network", {}).get("target_modules", "unset") is None:
        resolved["network"].pop("target_modules")  # the default, added later: published hashes stay valid
    if resolved.get("network", {}).get("kv_reg_strength", "unset") == 0:
        resolved["network"].pop("kv_reg_strength")  # likewise
    base, data = Path(str(cfg.base_model)), Path(str(cfg.data.path))
    reg = Path(str(cfg.data.reg_path)) if cfg.data.get("reg_path") else None
    # Paths are hashed by content, so the same recipe hashes the same from any working directory.
    if base.exists():
        resolved.pop("base_model")
    if data.exists():
        resolved["data"].pop("path")
    if reg is not None and reg.exists():
        resolved["data"]["reg_path"] = tree_hash(reg)
    return content_hash(resolved, base, data)


CACHE_ENV = "LORAKIT_TOY_LORAS"


def default_cache_dir() -> Path:
    """The one cache of trained toy concept LoRAs, shared by ``lorakit demo``, the tests and ``.ci/run``:
    ``$LORAKIT_TOY_LORAS`` when set, else ``<repository>/artifacts/adapters`` in a clone, else (an installed
    package) ``~/.cache/lorakit/toy-loras``. Files are named by recipe hash, so one cache holds every recipe
    variant and a LoRA is trained once per hash."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file() and (repo / "lorakit").is_dir():
        return repo / "artifacts" / "adapters"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorakit" / "toy-loras"


def _overrides(name: str, base: str | None, overrides: list[str] | None) -> list[str]:
    # Recipes name repo-relative paths: resolve them against the repository, whatever the working directory.
    out = [f"base_model={base or data_path('toy-base')}", f"data.path={data_path('toy', name)}"]
    reg = _recipe_reg_path(name)
    if reg and Path(reg).parts[0] == "data":
        out.append(f"data.reg_path={data_path(*Path(reg).parts[1:])}")
    return [*out, *(overrides or [])]


def _recipe_reg_path(name: str) -> str | None:
    """The recipe's ``data.reg_path`` as written (a ``data/...`` path in the bundled recipes), or None."""
    from omegaconf import OmegaConf

    reg = OmegaConf.select(OmegaConf.load(recipe_path(name)), "data.reg_path")
    return str(reg) if reg else None


def concept_lora_path(concept: str, out_dir: str | os.PathLike, base: str | None = None,
                      overrides: list[str] | None = None) -> Path:
    """Where :func:`train_concept_lora` keeps (or will keep) this concept's LoRA: ``out_dir/toy_<concept>-<hash>
    .safetensors``; it is cached when the file exists."""
    name = get_concept(concept).name
    return recipe_lora_path(recipe_path(name), f"toy_{name}", out_dir, _overrides(name, base, overrides))


def train_concept_lora(concept: str, out_dir: str | os.PathLike, base: str | None = None,
                       overrides: list[str] | None = None, force: bool = False) -> Path:
    """Train (or reuse) the LoRA of one held-out toy concept.

    Args:
        concept: held-out concept name or trigger word (``frog``, ``kwibbit``, ...).
        out_dir: the LoRA goes to ``out_dir/toy_<concept>-<hash>.safetensors`` (:func:`concept_lora_path`).
        base: base model (default: the recipe's, ``data/toy-base``).
        overrides: extra ``key=value`` recipe overrides (e.g. ``["max_steps=100"]``).
        force: retrain even when a LoRA with the same recipe hash exists.
    Returns:
        Path of the adapter file (kohya keys; ``lorakit.trigger`` in its metadata).
    """
    name = get_concept(concept).name
    return train_recipe_lora(recipe_path(name), f"toy_{name}", out_dir, _overrides(name, base, overrides), force)


def recipe_config(recipe: Path, overrides: list[str], trainer: str = "blockwise"):
    """The resolved recipe of ``trainer`` (a :data:`lorakit.training.entry.TRAINERS` name) with ``overrides``."""
    return resolve(trainer, recipe, overrides)


def recipe_lora_path(recipe: Path, stem: str, out_dir: str | os.PathLike, overrides: list[str],
                     trainer: str = "blockwise") -> Path:
    """``out_dir/<stem>-<recipe hash>.safetensors``: where :func:`train_recipe_lora` keeps this recipe's LoRA."""
    return Path(out_dir) / f"{stem}-{recipe_hash(recipe_config(recipe, overrides, trainer))}.safetensors"


def train_recipe_lora(recipe: Path, stem: str, out_dir: str | os.PathLike, overrides: list[str],
                      force: bool = False) -> Path:
    """Train a block-wise recipe (with ``overrides``) into ``out_dir/<stem>-<hash>.safetensors``, or return that
    file when it exists (and not ``force``). The latent cache is ``out_dir/latent_cache``."""
    import tempfile

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = recipe_lora_path(recipe, stem, out_dir, overrides)
    if target.exists() and not force:
        return target
    with tempfile.TemporaryDirectory(prefix=f"{stem}-", dir=out_dir) as work:
        run = load_config(BlockwiseConfig, recipe, overrides + [f"output_dir={work}", "checkpointing_steps=0",
                                                                "checkpoint_at_end=false", "save_every=0",
                                                                "logging=none",
                                                                f"data.cache_dir={out_dir / 'latent_cache'}"])
        # The trainer's summary names the temporary folder, which is gone when this returns: print it with the
        # path the LoRA is kept at instead, so every printed path exists.
        result, printed = train_captured("blockwise", run)
        copy_file(result.final_path, target)
        text = printed.replace(str(result.final_path), str(target))
        print("\n".join(line for line in text.splitlines() if work not in line), flush=True)
    return target


def train_recipe_lora_chunk(recipe: Path, stem: str, out_dir: str | os.PathLike, overrides: list[str],
                            stop_at_step: int) -> Path | None:
    """Train a block-wise recipe up to step ``stop_at_step`` (or its ``max_steps``, if fewer), continuing where an
    earlier call stopped (:func:`lorakit.training.chunked.train_chunk`, in ``out_dir/.<stem>-<hash>.partial``);
    returns the LoRA (the file :func:`train_recipe_lora` would write, bit for bit, same hash) once ``max_steps``
    are done, else None."""
    target = recipe_lora_path(recipe, stem, out_dir, overrides)
    return train_chunk("blockwise", recipe, overrides, target, stop_at_step, Path(out_dir) / "latent_cache")


def partial_step(target: Path) -> int:
    """The step an unfinished :func:`train_recipe_lora_chunk` run of ``target`` has reached (0: not started)."""
    return trained_step(target)
