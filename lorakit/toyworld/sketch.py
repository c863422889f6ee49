"""Toy-world sketches: generic shapes placed anywhere, with their silhouettes (the spatial condition).

A :class:`SketchScene` is one or two generic shapes on a generic background; :func:`render_sketch_scene` draws the
image and the silhouette (1 on the shapes, 0 elsewhere; anti-aliased) with the renderer's own shapes. Two-shape
scenes put one shape in each half (left, right), the layout regional sampling uses with a box per half.

>>> scene = random_sketch_scene(np.random.default_rng(0), n_shapes=2)
>>> image, silhouette = render_sketch_scene(scene)      # PIL RGB 32x32, float32 [32, 32] in [0, 1]
>>> scene.region_prompts()                               # one prompt per half, e.g. ['red circle, white plain background', ...]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from lorakit.toyworld.concepts import BACKGROUND_COLORS, GENERIC_BACKGROUNDS, SHAPE_COLORS, SHAPES
from lorakit.toyworld.render import SUPERSAMPLE, Scene, _background, _shape

HALVES = ((0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0))  # left, right: (top, left, bottom, right) fractions


@dataclass(frozen=True)
class Placed:
    """A generic shape at centre (cx, cy) with radius r, all fractions of the image side."""

    shape: str
    color: str
    cx: float
    cy: float
    r: float


@dataclass(frozen=True)
class SketchScene:
    """One or two placed shapes on a generic background (two shapes: the first in the left half)."""

    shapes: tuple[Placed, ...]
    background: str = "plain"
    bg_color: str = "white"
    seed: int = 0

    def background_prompt(self) -> str:
        return f"{self.bg_color} {self.background} background"

    def region_prompts(self) -> list[str]:
        """A prompt per shape, written like the toy base's captions."""
        return [f"{p.color} {p.shape}, {self.background_prompt()}" for p in self.shapes]


def random_sketch_scene(rng: np.random.Generator, n_shapes: int = 1, background: str | None = None,
                        bg_color: str | None = None) -> SketchScene:
    """A random scene: one shape anywhere (radius 0.12-0.28) or two, one per half (radius 0.10-0.17).

    ``background`` / ``bg_color`` fix the background (default: random generic ones).
    """
    colors = list(SHAPE_COLORS)
    shapes = []
    for k in range(n_shapes):
        if n_shapes == 1:
            r = rng.uniform(0.12, 0.28)
            cx, cy = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)
        else:
            r = rng.uniform(0.10, 0.17)
            lo = 0.5 * k
            cx, cy = rng.uniform(lo + r + 0.02, lo + 0.5 - r - 0.02), rng.uniform(r + 0.05, 1 - r - 0.05)
        shapes.append(Placed(SHAPES[rng.integers(len(SHAPES))], colors[rng.integers(len(colors))], float(cx), float(cy), float(r)))
    bg = background or GENERIC_BACKGROUNDS[rng.integers(len(GENERIC_BACKGROUNDS))]
    bgc = bg_color or list(BACKGROUND_COLORS)[rng.integers(len(BACKGROUND_COLORS))]
    return SketchScene(tuple(shapes), bg, bgc, int(rng.integers(2**31)))


def render_sketch_scene(scene: SketchScene, size: int = 32) -> tuple[Image.Image, np.ndarray]:
    """The scene's RGB image and its silhouette ``[size, size]`` float32 in [0, 1]."""
    n = size * SUPERSAMPLE
    rng = np.random.default_rng(scene.seed)
    bg = _background(Scene(background=scene.background, bg_color=scene.bg_color), n, rng)
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    mask = Image.new("L", (n, n), 0)
    d, dm = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    for p in scene.shapes:
        _shape(d, p.shape, p.cx * n, p.cy * n, p.r * n, SHAPE_COLORS[p.color])
        _shape(dm, p.shape, p.cx * n, p.cy * n, p.r * n, 255)
    image = canvas.resize((size, size), Image.BOX)
    silhouette = np.asarray(mask.resize((size, size), Image.BOX), np.float32) / 255.0
    return image, silhouette


def silhouette_image(silhouette: np.ndarray) -> Image.Image:
    """A silhouette as the grayscale sketch image an adapter reads (white shapes on black)."""
    return Image.fromarray((np.clip(silhouette, 0, 1) * 255).round().astype(np.uint8), mode="L")
