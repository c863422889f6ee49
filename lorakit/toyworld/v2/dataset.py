"""Write toy world v2 datasets: ``NNNNN.png`` + ``NNNNN.txt`` (whole-scene caption) pairs, 64x64."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lorakit.toyworld.dataset import write_scenes
from lorakit.toyworld.v2.render import caption, render
from lorakit.toyworld.v2.scenes import class_scene, concept_scene

# The name ``make_dataset`` takes for regularisation images: scenes of the class world (what the base draws).
CLASS_WORLD = "class"


def make_dataset(concept: str, out_dir: str | os.PathLike, n: int, seed: int = 0) -> list[Path]:
    """Render ``n`` images of one identity (``kwibbit``...) in class-world surroundings into ``out_dir``, or with
    ``concept="class"`` ``n`` class-world scenes (the regularisation images of a LoRA recipe, ``data.reg_path``).

    Same arguments -> byte-identical files. Returns the image paths in order.

    Raises:
        ValueError: for a concept that is not an identity (or ``class``), or ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    scenes = [class_scene(rng) if concept == CLASS_WORLD else concept_scene(concept, rng) for _ in range(n)]
    return write_scenes(scenes, out_dir, render, caption)
