"""Write toy-world datasets: a folder of ``NNNNN.png`` + ``NNNNN.txt`` (comma-tag caption) pairs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lorakit.fileio import save_image, write_text
from lorakit.toyworld.render import caption, render
from lorakit.toyworld.scenes import concept_scene, generic_scene


# The name ``make_dataset`` takes for the regularisation folder: generic scenes (what the base already draws).
GENERIC = "generic"


def make_dataset(concept: str, out_dir: str | os.PathLike, n: int, seed: int = 0, size: int = 32) -> list[Path]:
    """Render ``n`` training images of one concept (name or trigger word) into ``out_dir``; ``concept="generic"``
    renders generic scenes with their own captions instead (``red circle, cyan plain background``; a few empty
    backgrounds), the regularisation images (``data.reg_path``) that keep a LoRA from rewriting what the base
    draws for prompts without its trigger.

    Each image ``out_dir/00000.png`` has its caption in ``out_dir/00000.txt`` (the format the trainers read).
    Same arguments -> byte-identical files.

    Returns:
        the image paths, in order.
    Raises:
        ValueError: for an unknown concept or ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    scenes = [generic_scene(rng) if concept == GENERIC else concept_scene(concept, rng) for _ in range(n)]
    return write_scenes(scenes, out_dir, lambda s: render(s, size), caption)


def write_scenes(scenes, out_dir: str | os.PathLike, draw, describe) -> list[Path]:
    """Write ``draw(scene)`` as ``out_dir/00000.png`` and ``describe(scene)`` as ``out_dir/00000.txt`` for each
    scene in order (the folder format the trainers read). Returns the image paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(scenes):
        paths.append(save_image(draw(scene), out / f"{i:05d}.png"))
        write_text(describe(scene) + "\n", out / f"{i:05d}.txt")
    return paths
