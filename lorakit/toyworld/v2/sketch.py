"""Toy world v2 characters placed by sketches: v1's character scenes (:mod:`lorakit.toyworld.sketch`) drawn with
v2's sprites at 64x64, class characters (any colour and variation) and identities alike.

>>> scene = random_character_scene(np.random.default_rng(0), ("kwibbit", "zorbo"))
>>> image, silhouette = render_character_scene(scene)   # PIL RGB 64x64, float32 [64, 64] in [0, 1]
>>> scene.region_prompts()    # ['kwibbit frog, white plain background', 'zorbo robot, white plain background']
>>> scene.global_prompt()     # 'kwibbit frog, zorbo robot, white plain background'

:func:`training_scene` draws the sketch adapter's training scenes: one class character anywhere, or two, one per
half (the layout regional sampling uses), on the base's backgrounds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from lorakit.toyworld import sketch as v1
from lorakit.toyworld.concepts import BACKGROUND_COLORS, SHAPE_COLORS
from lorakit.toyworld.sketch import render_character_scene  # noqa: F401 - the v1 function draws v2 scenes too
from lorakit.toyworld.v2.concepts import CONCEPTS
from lorakit.toyworld.v2.render import SIZE, _SPRITES, Scene, _background, caption
from lorakit.toyworld.v2.scenes import CLASS_BACKGROUNDS, CLASS_CHARACTERS

# Extent of each character class around its anchor (cx, cy), in units of its size s: (half width, top, bottom),
# the largest over the class's variation and its identity, read off the sprite functions of
# lorakit.toyworld.v2.render.
CHARACTER_EXTENT = {"robot": (0.30, 0.53, 0.54), "frog": (0.48, 0.36, 0.42), "ghost": (0.37, 0.50, 0.50)}


def class_of(name: str) -> str:
    """``frog`` for ``kwibbit`` and for ``frog``."""
    c = CONCEPTS[name]
    return c.cls if c.role == "identity" else name


@dataclass(frozen=True)
class PlacedCharacter(v1.PlacedCharacter):
    """A v2 character (class or identity) at (cx, cy) with size s; a class character has a colour and a
    variation (4 numbers in [0, 1): the renderer's proportions and parts)."""

    colour: str = "red"
    variation: tuple[float, ...] = (0.5, 0.5, 0.5, 0.5)

    def box(self) -> tuple[float, float, float, float]:
        hw, top, bottom = CHARACTER_EXTENT[class_of(self.name)]
        return (self.cy - top * self.s, self.cx - hw * self.s, self.cy + bottom * self.s, self.cx + hw * self.s)

    def identity(self) -> bool:
        return CONCEPTS[self.name].role == "identity"


@dataclass(frozen=True)
class CharacterScene(v1.CharacterScene):
    """One or two v2 characters (two: the first in the left half) on a v2 background; captions as v2's."""

    seed: int = 0  # the background's randomness (stripes offset, stars)
    size = SIZE

    def _scene(self, characters) -> Scene:
        return Scene(background=self.background, bg_color=self.bg_color,
                     characters=tuple(c.name for c in characters), char_colors=tuple(c.colour for c in characters))

    def background_prompt(self) -> str:
        return caption(self._scene(()))

    def region_prompts(self) -> list[str]:
        """A prompt per character: its v2 caption (``kwibbit frog, white plain background``)."""
        return [caption(self._scene((c,))) for c in self.characters]

    def global_prompt(self) -> str:
        """The whole scene's caption (``kwibbit frog, zorbo robot, white plain background``), as Mix-of-Show's
        global prompt names every concept."""
        return caption(self._scene(self.characters))

    def background_pixels(self, n: int) -> np.ndarray:
        return _background(self._scene(()), n, np.random.default_rng(self.seed))

    def draw(self, d, n: int) -> None:
        for c in self.characters:
            _SPRITES[class_of(c.name)](d, c.cx * n, c.cy * n, c.s * n, SHAPE_COLORS[c.colour], c.variation,
                                       c.identity())


def random_character_scene(rng: np.random.Generator, characters=("kwibbit", "zorbo"), background: str = "plain",
                           bg_color: str = "white", colours=None) -> CharacterScene:
    """One character per half, each of a random size (0.40-0.55 of the side) at a random place inside its half
    (:func:`lorakit.toyworld.sketch.place_characters`); ``colours``: the class characters' colours."""
    placed = v1.place_characters(rng, [CHARACTER_EXTENT[class_of(name)] for name in characters])
    colours = colours or ["red"] * len(characters)
    chars = tuple(PlacedCharacter(name, cx, cy, s, col, tuple(float(v) for v in rng.uniform(0, 1, 4)))
                  for name, (cx, cy, s), col in zip(characters, placed, colours))
    return CharacterScene(chars, background, bg_color)


def training_scene(rng: np.random.Generator, n_characters: int) -> CharacterScene:
    """A sketch adapter training scene of class characters (random class, colour, variation): one anywhere
    (size 0.45-0.75 of the side) or two, one per half (0.40-0.55); a background of the base's world."""
    colours, bg_colours = list(SHAPE_COLORS), list(BACKGROUND_COLORS)
    names = [CLASS_CHARACTERS[int(rng.integers(len(CLASS_CHARACTERS)))] for _ in range(n_characters)]
    cols = [colours[int(rng.integers(len(colours)))] for _ in names]
    background = CLASS_BACKGROUNDS[int(rng.integers(len(CLASS_BACKGROUNDS)))]
    bg_color = bg_colours[int(rng.integers(len(bg_colours)))]
    if n_characters == 2:
        scene = random_character_scene(rng, names, background, bg_color, cols)
    else:
        hw, top, bottom = CHARACTER_EXTENT[names[0]]
        s = float(rng.uniform(0.45, 0.75))
        cx = float(rng.uniform(hw * s + 0.02, 1 - hw * s - 0.02))
        cy = float(rng.uniform(top * s + 0.02, 1 - bottom * s - 0.02))
        scene = CharacterScene((PlacedCharacter(names[0], cx, cy, s, cols[0],
                                                tuple(float(v) for v in rng.uniform(0, 1, 4))),), background, bg_color)
    return replace(scene, seed=int(rng.integers(2**31)))
