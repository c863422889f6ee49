"""Random v2 scene generators: the base's class world, identity datasets, and mixed scenes (VAE / oracle).

All take a ``numpy.random.Generator`` so a seed fixes the whole sequence.
"""

from __future__ import annotations

import numpy as np

from lorakit.toyworld.concepts import (
    BACKGROUND_COLORS,
    GENERIC_BACKGROUNDS,
    SHAPE_COLORS,
    SHAPES,
)
from lorakit.toyworld.v2.concepts import CONCEPTS, IDENTITY_OF_CLASS, get_concept
from lorakit.toyworld.v2.render import Scene

CLASS_CHARACTERS = ("robot", "frog", "ghost")
CLASS_BACKGROUNDS = (*GENERIC_BACKGROUNDS, "checker", "night")


def _pick(rng, items):
    items = list(items)
    return items[int(rng.integers(len(items)))]


def _seed(rng) -> int:
    return int(rng.integers(2**31))


def class_scene(rng: np.random.Generator, p_identity: float = 0.0) -> Scene:
    """A scene of the base's world: a generic shape (35%) or 1-2 class characters with maybe a hat and a
    mushroom, or objects alone; on a generic, checker or night background; 20% in the outline or mosaic style.

    ``p_identity``: probability that each class thing is replaced by its identity (0 for the base's data;
    > 0 for the VAE's and the oracle's mixed scenes).
    """

    def maybe_id(name):
        return IDENTITY_OF_CLASS[name] if name and rng.random() < p_identity else name

    colours = list(SHAPE_COLORS)
    u = rng.random()
    shape, chars, hat, mush = None, (), None, None
    if u < 0.35:
        shape = _pick(rng, SHAPES)
    elif u < 0.85:
        chars = (_pick(rng, CLASS_CHARACTERS),) if rng.random() < 0.7 else tuple(
            rng.choice(CLASS_CHARACTERS, size=2, replace=rng.random() < 0.2))
        hat = "hat" if rng.random() < 0.35 else None
        mush = "mushroom" if rng.random() < 0.25 else None
    elif u < 0.97:
        v = rng.random()
        hat = "hat" if v < 0.7 else None
        mush = "mushroom" if v >= 0.4 else None
    bg = _pick(rng, CLASS_BACKGROUNDS)
    style = None
    if rng.random() < 0.2:
        style = "outline" if rng.random() < 0.5 else "mosaic"
    return Scene(
        background=maybe_id(bg) if bg in IDENTITY_OF_CLASS else bg,
        bg_color=_pick(rng, BACKGROUND_COLORS),
        shape=shape,
        shape_color=_pick(rng, colours),
        characters=tuple(maybe_id(str(c)) for c in chars),
        char_colors=tuple(_pick(rng, colours) for _ in chars),
        hat=maybe_id(hat),
        hat_color=_pick(rng, colours),
        mushroom=maybe_id(mush),
        mushroom_color=_pick(rng, colours),
        style=maybe_id(style),
        seed=_seed(rng),
    )


def mixed_scene(rng: np.random.Generator) -> Scene:
    """Any v2 scene: the class world with each class thing an identity half of the time (VAE and oracle data)."""
    return class_scene(rng, p_identity=0.5)


def concept_scene(name: str, rng: np.random.Generator) -> Scene:
    """A training scene for one identity (a LoRA's dataset): the identity on varied class-world surroundings.

    Characters stand alone; an object is worn by (a hat) or stands next to (a mushroom) a class character half the
    time, as it does in the sets it is composed in; styles are applied to class scenes; backgrounds carry a shape or a
    class character.
    """
    c = get_concept(name)
    if c.role != "identity":
        raise ValueError(f"{name!r} is a {c.role} concept; concept datasets are made for identities: "
                         f"{', '.join(IDENTITY_OF_CLASS.values())}")
    while True:  # a class scene that has the identity's class, to swap in the identity
        base = class_scene(rng)
        if c.kind == "style":
            return Scene(**{**_fields(base), "style": name})
        if c.kind == "background":
            if base.characters or base.shape:
                return Scene(**{**_fields(base), "background": name, "hat": None, "mushroom": None})
            continue
        if c.kind == "character":
            return Scene(**{**_fields(base), "shape": None, "characters": (name,), "char_colors": (),
                            "hat": None, "mushroom": None, "style": None})
        fields = {**_fields(base), "shape": None, "style": None, "hat": None, "mushroom": None}
        if rng.random() < 0.5:  # one draw for hats as before 2026-12-05, so hattock's data is unchanged
            fields["characters"], fields["char_colors"] = base.characters[:1], base.char_colors[:1]
        else:
            fields["characters"], fields["char_colors"] = (), ()
        fields["hat" if c.cls == "hat" else "mushroom"] = name
        return Scene(**fields)


def _fields(scene: Scene) -> dict:
    from dataclasses import asdict

    return asdict(scene)


assert set(IDENTITY_OF_CLASS) <= set(CONCEPTS)
