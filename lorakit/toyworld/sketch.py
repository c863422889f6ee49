"""Toy-world sketches: generic shapes placed anywhere, with their silhouettes (the spatial condition).

A :class:`SketchScene` is one or two generic shapes on a generic background; :func:`render_sketch_scene` draws the
image and the silhouette (1 on the shapes, 0 elsewhere; anti-aliased) with the renderer's own shapes. Two-shape
scenes put one shape in each half (left, right), the layout regional sampling uses with a box per half.

>>> scene = random_sketch_scene(np.random.default_rng(0), n_shapes=2)
>>> image, silhouette = render_sketch_scene(scene)      # PIL RGB 32x32, float32 [32, 32] in [0, 1]
>>> scene.region_prompts()                               # one prompt per half, e.g. ['red circle, white plain background', ...]

Characters placed by sketches (Mix-of-Show's figure): a :class:`CharacterScene` puts one held-out character per
half at a random size and place; :func:`render_character_scene` draws them with the renderer's sprites and returns
their silhouette (the sketch) too.

>>> scene = random_character_scene(np.random.default_rng(0), ("frog", "robot"))
>>> image, silhouette = render_character_scene(scene)
>>> scene.region_prompts()                               # ['kwibbit, white plain background', 'zorbo, white plain background']
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from lorakit.toyworld.concepts import BACKGROUND_COLORS, GENERIC_BACKGROUNDS, SHAPES, SHAPE_COLORS, get_concept
from lorakit.toyworld.render import SUPERSAMPLE, Scene, _CHARACTERS, _background, draw_shape

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
        draw_shape(d, p.shape, p.cx * n, p.cy * n, p.r * n, SHAPE_COLORS[p.color])
        draw_shape(dm, p.shape, p.cx * n, p.cy * n, p.r * n, 255)
    image = canvas.resize((size, size), Image.BOX)
    silhouette = np.asarray(mask.resize((size, size), Image.BOX), np.float32) / 255.0
    return image, silhouette


def silhouette_image(silhouette: np.ndarray) -> Image.Image:
    """A silhouette as the grayscale sketch image an adapter reads (white shapes on black)."""
    return Image.fromarray((np.clip(silhouette, 0, 1) * 255).round().astype(np.uint8), mode="L")


# ---------------------------------------------------------------- characters placed by sketches

# Extent of each character sprite around its anchor (cx, cy), in units of its size s: (half width, top, bottom),
# read off the sprite functions of lorakit.toyworld.render.
CHARACTER_EXTENT = {"robot": (0.26, 0.53, 0.48), "frog": (0.46, 0.32, 0.42), "ghost": (0.33, 0.48, 0.47)}


@dataclass(frozen=True)
class PlacedCharacter:
    """A held-out character sprite anchored at (cx, cy) with size s, all fractions of the image side."""

    name: str
    cx: float
    cy: float
    s: float

    def box(self) -> tuple[float, float, float, float]:
        """Its bounding box (top, left, bottom, right), fractions."""
        hw, top, bottom = CHARACTER_EXTENT[self.name]
        return (self.cy - top * self.s, self.cx - hw * self.s, self.cy + bottom * self.s, self.cx + hw * self.s)


@dataclass(frozen=True)
class CharacterScene:
    """Two characters, one per half (the first on the left), on a generic background."""

    characters: tuple[PlacedCharacter, ...]
    background: str = "plain"
    bg_color: str = "white"

    def background_prompt(self) -> str:
        return f"{self.bg_color} {self.background} background"

    size = 32  # the toy world's image side

    def region_prompts(self) -> list[str]:
        """A prompt per character, written like the toy LoRAs' captions (trigger word, background)."""
        return [f"{get_concept(c.name).trigger}, {self.background_prompt()}" for c in self.characters]

    def global_prompt(self) -> str:
        """The prompt outside the regions: the background (v1's LoRAs know their characters only alone)."""
        return self.background_prompt()

    def background_pixels(self, n: int) -> np.ndarray:
        return _background(Scene(background=self.background, bg_color=self.bg_color), n, np.random.default_rng(0))

    def draw(self, d, n: int) -> None:
        """Draw the characters on ``d``, an ``n`` x ``n`` canvas."""
        for c in self.characters:
            _CHARACTERS[c.name](d, c.cx * n, c.cy * n, c.s * n)


def place_characters(rng: np.random.Generator, extents, s_range=(0.40, 0.55)) -> list[tuple[float, float, float]]:
    """``(cx, cy, s)`` for each character of ``extents`` (its ``(half width, top, bottom)`` in units of its size),
    one per half (the first on the left): a random size in ``s_range`` (cut so the sprite fits its half, 0.02 from
    each side) at a random place that keeps the whole sprite inside its half."""
    placed = []
    for k, (hw, top, bottom) in enumerate(extents):
        s = float(rng.uniform(*s_range))
        s = min(s, 0.44 / (2 * hw))
        lo = 0.5 * k
        cx = rng.uniform(lo + hw * s + 0.02, lo + 0.5 - hw * s - 0.02)
        cy = rng.uniform(top * s + 0.04, 1 - bottom * s - 0.04)
        placed.append((float(cx), float(cy), s))
    return placed


def random_character_scene(rng: np.random.Generator, characters=("frog", "robot"), background: str = "plain",
                           bg_color: str = "white") -> CharacterScene:
    """One character per half, each of a random size (0.40-0.55 of the image side) at a random place that keeps
    its whole sprite inside its half."""
    placed = place_characters(rng, [CHARACTER_EXTENT[name] for name in characters])
    return CharacterScene(tuple(PlacedCharacter(name, cx, cy, s) for name, (cx, cy, s) in zip(characters, placed)),
                          background, bg_color)


class _MaskDraw:
    """Draws what a sprite function draws, in one grey level (its silhouette)."""

    def __init__(self, draw: ImageDraw.ImageDraw):
        self._draw = draw

    def __getattr__(self, name):
        method = getattr(self._draw, name)
        return lambda *args, **kwargs: method(*args, **{**kwargs, "fill": 255})


def render_character_scene(scene, size: int | None = None) -> tuple[Image.Image, np.ndarray]:
    """The scene's RGB image (the characters as its toy world draws them) and its silhouette ``[size, size]``
    (default size: the scene's world's, ``scene.size``). ``scene``: a :class:`CharacterScene` or v2's
    (:mod:`lorakit.toyworld.v2.sketch`)."""
    size = size or scene.size
    n = size * SUPERSAMPLE
    canvas = Image.fromarray(np.clip(scene.background_pixels(n), 0, 255).astype(np.uint8))
    mask = Image.new("L", (n, n), 0)
    scene.draw(ImageDraw.Draw(canvas), n)
    scene.draw(_MaskDraw(ImageDraw.Draw(mask)), n)
    image = canvas.resize((size, size), Image.BOX)
    silhouette = np.asarray(mask.resize((size, size), Image.BOX), np.float32) / 255.0
    return image, silhouette
