"""Random scene generators: generic scenes (what the base model learns), concept datasets, oracle mixtures.

All take a ``numpy.random.Generator`` so a seed fixes the whole sequence.
"""

from __future__ import annotations

import numpy as np

from lorakit.toyworld.concepts import (
    BACKGROUND_COLORS,
    GENERIC_BACKGROUNDS,
    SHAPE_COLORS,
    SHAPES,
    concepts_of_kind,
    get_concept,
)
from lorakit.toyworld.render import Scene


def _pick(rng: np.random.Generator, items):
    items = list(items)
    return items[int(rng.integers(len(items)))]


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31))


def generic_scene(rng: np.random.Generator, p_empty: float = 0.08) -> Scene:
    """A generic scene: one coloured shape (or, with probability ``p_empty``, none) on a generic background."""
    shape = None if rng.random() < p_empty else _pick(rng, SHAPES)
    return Scene(
        background=_pick(rng, GENERIC_BACKGROUNDS),
        bg_color=_pick(rng, BACKGROUND_COLORS),
        shape=shape,
        shape_color=_pick(rng, SHAPE_COLORS),
        seed=_seed(rng),
    )


def concept_scene(name: str, rng: np.random.Generator) -> Scene:
    """A training scene for one concept (a LoRA's dataset): the concept on varied generic surroundings.

    Characters and objects stand alone on generic backgrounds; styles are applied to generic scenes;
    backgrounds get a generic shape half of the time; generic concepts get generic scenes that show them.
    """
    c = get_concept(name)
    base = generic_scene(rng, p_empty=0.0)
    if c.kind == "character":
        return Scene(base.background, base.bg_color, characters=(c.name,), seed=base.seed)
    if c.kind == "object":
        return Scene(base.background, base.bg_color, objects=(c.name,), seed=base.seed)
    if c.kind == "style":
        return Scene(base.background, base.bg_color, base.shape, base.shape_color, style=c.name, seed=base.seed)
    if c.kind == "background":
        if c.heldout:
            shape = base.shape if rng.random() < 0.5 else None
            return Scene(c.name, shape=shape, shape_color=base.shape_color, seed=base.seed)
        return Scene(c.name, base.bg_color, base.shape, base.shape_color, seed=base.seed)
    if c.kind == "shape":
        return Scene(base.background, base.bg_color, c.name, base.shape_color, seed=base.seed)
    return Scene(base.background, base.bg_color, base.shape, c.name, seed=base.seed)  # colour


def mixed_scene(rng: np.random.Generator) -> Scene:
    """Any scene the toy world can draw (generic and held-out concepts mixed): the oracle's training data."""
    heldout_bgs = [c.name for c in concepts_of_kind("background", heldout=True)]
    chars = [c.name for c in concepts_of_kind("character")]
    objs = [c.name for c in concepts_of_kind("object")]
    styles = [c.name for c in concepts_of_kind("style")]
    base = generic_scene(rng, p_empty=0.0)
    background = _pick(rng, heldout_bgs) if rng.random() < 0.3 else base.background
    u = rng.random()
    shape, characters, objects = None, (), ()
    if u < 0.33:
        shape = base.shape
    elif u < 0.63:
        characters = (_pick(rng, chars),)
    elif u < 0.78:
        a, b = rng.choice(len(chars), size=2, replace=False)
        characters = (chars[a], chars[b])
    elif u < 0.92:
        objects = (_pick(rng, objs),)
    if characters:
        objects = tuple(o for o in objs if rng.random() < 0.25)
    style = _pick(rng, styles) if rng.random() < 0.35 else None
    return Scene(background, base.bg_color, shape, base.shape_color, characters, objects, style, base.seed)
