"""Train toy world v2 identity ED-LoRAs (Mix-of-Show) from their recipes, in parts, cached by recipe hash.

``train_configs/toy2_edlora_<identity>.yaml`` for the character and object identities: pseudo-words
``<name1> <name2>`` (layer-wise embeddings; the second initialised from the class word), captions as the v2
LoRAs' (``kwibbit frog, ...``, the identity word replaced by the pseudo-words). The data is rendered under the
cache as for the v2 LoRAs (:func:`lorakit.toyworld.v2.loras.ensure_data`); the file is
``<cache>/toy2_edlora_<identity>-<hash>.safetensors``, trained by :func:`lorakit.training.chunked.train_chunk`.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorakit.toyworld.loras import recipe_config, recipe_lora_path
from lorakit.toyworld.v2.concepts import IDENTITIES, get_concept
from lorakit.toyworld.v2.loras import bundled_recipe, check_base, ensure_data
from lorakit.training.chunked import train_chunk

KINDS = ("character", "object")
EDLORA_IDENTITIES = tuple(c.name for c in IDENTITIES if c.kind in KINDS)


def edlora_identity(identity: str) -> str:
    """``identity`` if it is a v2 character or object identity, else a ValueError naming those."""
    c = get_concept(identity)
    if c.role != "identity" or c.kind not in KINDS:
        raise ValueError(f"{identity!r}: v2 ED-LoRAs are made for the character and object identities: "
                         f"{', '.join(EDLORA_IDENTITIES)}")
    return c.name


def recipe_path(identity: str) -> Path:
    """``train_configs/toy2_edlora_<identity>.yaml``."""
    return bundled_recipe(f"toy2_edlora_{edlora_identity(identity)}", f"ED-LoRA recipe for {identity!r}")


def _overrides(identity: str, base: str | os.PathLike, out_dir: Path, overrides: list[str] | None) -> list[str]:
    check_base(base)
    data, _ = ensure_data(identity, out_dir / "toy2-data")
    return [f"base_model={base}", f"data.path={data}", *(overrides or [])]


def edlora_path(identity: str, out_dir: str | os.PathLike, base: str | os.PathLike,
                overrides: list[str] | None = None) -> Path:
    """Where :func:`train_identity_edlora_chunk` keeps this identity's ED-LoRA (``out_dir/toy2_edlora_<identity>
    -<hash>.safetensors``)."""
    name = edlora_identity(identity)
    return recipe_lora_path(recipe_path(name), f"toy2_edlora_{name}", out_dir,
                            _overrides(name, base, Path(out_dir), overrides), trainer="edlora")


def max_steps(identity: str, out_dir: str | os.PathLike, base: str | os.PathLike,
              overrides: list[str] | None = None) -> int:
    """The recipe's ``max_steps`` (with ``overrides``)."""
    name = edlora_identity(identity)
    return recipe_config(recipe_path(name), _overrides(name, base, Path(out_dir), overrides), "edlora").max_steps


def train_identity_edlora_chunk(identity: str, out_dir: str | os.PathLike, base: str | os.PathLike,
                                stop_at_step: int, overrides: list[str] | None = None) -> Path | None:
    """Train ``identity``'s ED-LoRA up to ``stop_at_step``, continuing an earlier call's run; the file (the
    uninterrupted run's, bit for bit) once the recipe's ``max_steps`` are done, else None.

    Args:
        identity: a v2 character or object identity (``zorbo``, ``kwibbit``, ``bloopo``, ``hattock``,
            ``shroomel``).
        out_dir: the cache folder; the data goes to ``out_dir/toy2-data``.
        base: a v2 pipeline folder.
        stop_at_step: the step this call trains up to.
        overrides: extra ``key=value`` recipe overrides (part of the hash).
    """
    name = edlora_identity(identity)
    over = _overrides(name, base, Path(out_dir), overrides)
    return train_chunk("edlora", recipe_path(name), over, edlora_path(name, out_dir, base, overrides), stop_at_step)
