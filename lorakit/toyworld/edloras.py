"""Toy ED-LoRA concepts, trained from one recipe and cached by recipe hash next to the toy LoRAs.

``train_configs/toy_edlora_character.yaml`` applied to a held-out character or object: its images
(``data/toy/<name>``), its trigger word as the caption placeholder, pseudo-words ``<name1> <name2>`` and the
concept's name (a word of the toy tokenizer) as the init word. The file is
``<cache>/toy_edlora_<name>-<hash>.safetensors`` (:mod:`lorakit.toyworld.loras` hashes the resolved recipe, the
base weights and the images), so the tests, the demo and the benchmarks share one copy.

Training may run in chunks (``chunk_steps``), so a shared machine's job lock is never held for the whole run:
each call trains up to the next multiple of ``chunk_steps`` (:func:`lorakit.training.chunked.train_chunk`, in
``<cache>/.toy_edlora_<name>-<hash>.partial``; a run an earlier lorakit left in ``<cache>/toy_edlora_<name>-<hash>
.work`` is continued there). The ED-LoRA trainer keys every random draw by sample id, so a chunked run gives the
uninterrupted run's weights.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorakit.resources import data_path, toy_recipe
from lorakit.toyworld.concepts import get_concept
from lorakit.toyworld.loras import recipe_config, recipe_hash
from lorakit.training.chunked import train_chunk, trained_step

RECIPE = "edlora_character"
KINDS = ("character", "object")


def edlora_overrides(concept: str, base: str | None = None, overrides: list[str] | None = None) -> list[str]:
    """The recipe overrides that make ``toy_edlora_character.yaml`` learn ``concept``."""
    c = get_concept(concept)
    if not c.heldout or c.kind not in KINDS:
        raise ValueError(f"toy ED-LoRA concept {concept!r}: expected a held-out character or object")
    return [f"base_model={base or data_path('toy-base')}", f"data.path={data_path('toy', c.name)}",
            f"concept.name={c.name}", f"concept.tokens=<{c.name}1> <{c.name}2>", f"concept.init_word={c.name}",
            f"concept.placeholder={c.trigger}", "sample_every=0", *(overrides or [])]


def concept_edlora_path(concept: str, out_dir: str | os.PathLike, base: str | None = None,
                        overrides: list[str] | None = None) -> Path:
    """Where :func:`train_concept_edlora` keeps this concept's ED-LoRA (cached when the file exists)."""
    cfg = recipe_config(toy_recipe(RECIPE), edlora_overrides(concept, base, overrides), "edlora")
    return Path(out_dir) / f"toy_edlora_{get_concept(concept).name}-{recipe_hash(cfg)}.safetensors"


def train_concept_edlora(concept: str, out_dir: str | os.PathLike, base: str | None = None,
                         overrides: list[str] | None = None, chunk_steps: int = 0,
                         max_new_steps: int = 0) -> Path | None:
    """Train (or reuse) the toy ED-LoRA of ``concept``.

    Args:
        concept: a held-out character or object (``robot``, ``frog``, ``tophat``, ...).
        out_dir: the cache folder (e.g. :func:`lorakit.toyworld.loras.default_cache_dir`).
        base: base model (default: the bundled toy base).
        overrides: extra ``key=value`` recipe overrides (part of the hash).
        chunk_steps: > 0: train at most up to the next multiple of this many steps in this call.
        max_new_steps: > 0: train at most this many steps in this call (e.g. what fits in a time budget).
    Returns:
        The cached file, or None when this call stopped at a chunk boundary (call again to continue).
    """

    target = concept_edlora_path(concept, out_dir, base, overrides)
    recipe, over = toy_recipe(RECIPE), edlora_overrides(concept, base, overrides)
    max_steps = recipe_config(recipe, over, "edlora").max_steps
    done = trained_step(target)
    stop = min(max_steps, (done // chunk_steps + 1) * chunk_steps) if chunk_steps > 0 else max_steps
    if max_new_steps > 0:
        stop = min(stop, done + max_new_steps)
    return train_chunk("edlora", recipe, over, target, stop)


def trained_steps(concept: str, out_dir: str | os.PathLike, base: str | None = None,
                  overrides: list[str] | None = None) -> int:
    """Steps of ``concept``'s run done so far (its newest checkpoint; 0 before the first chunk)."""
    return trained_step(concept_edlora_path(concept, out_dir, base, overrides))

