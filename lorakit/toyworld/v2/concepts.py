"""Toy world v2's concepts: generic things, the classes the base learns, and the identities only LoRAs teach.

* **generic**: 4 shapes, 6 colours, 3 background kinds (plain, gradient, stripes) in 5 background colours
  (as in v1);
* **class** concepts the base learns with their variation: ``robot``, ``frog``, ``ghost`` (characters), ``hat``,
  ``mushroom`` (objects), ``outline``, ``mosaic`` (styles), ``checker``, ``night`` (backgrounds);
* **identity** concepts (held out from the base): one specific look of a class, named by its trigger word
  (``kwibbit`` is one particular frog). Captions name them as ``<trigger> <class word>`` (``kwibbit frog``).

A concept's ``name`` is what the oracle scores; every caption word is one token of the v2 tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.toyworld.concepts import (
    BACKGROUND_COLORS,
    GENERIC_BACKGROUNDS,
    SHAPE_COLORS,
    SHAPES,
)

KINDS = ("shape", "color", "background", "character", "object", "style")


@dataclass(frozen=True)
class Concept:
    """One v2 concept.

    Attributes:
        name: unique id (``circle``, ``frog``, ``kwibbit``...).
        kind: ``shape``, ``color``, ``background``, ``character``, ``object`` or ``style``.
        role: ``generic``, ``class`` or ``identity``.
        cls: for an identity, the class it belongs to (``frog`` for ``kwibbit``).
        description: what it looks like.
    """

    name: str
    kind: str
    role: str
    cls: str | None = None
    description: str = ""

    @property
    def heldout(self) -> bool:
        return self.role == "identity"


GENERIC: tuple[Concept, ...] = (
    *(Concept(s, "shape", "generic", description=f"a filled {s}") for s in SHAPES),
    *(Concept(c, "color", "generic", description=f"a {c} shape") for c in SHAPE_COLORS),
    *(Concept(b, "background", "generic", description=f"{b} background in one of 5 colours") for b in GENERIC_BACKGROUNDS),
)

CLASSES: tuple[Concept, ...] = (
    Concept("robot", "character", "class", description="box robot in one of the 6 colours; visor, antenna and legs vary"),
    Concept("frog", "character", "class", description="frog in one of the 6 colours, lighter belly, black-dot eyes; pose varies"),
    Concept("ghost", "character", "class", description="ghost in one of the 6 colours, black eyes; hem and size vary"),
    Concept("hat", "object", "class", description="a cone, dome, cap or top hat in one of the 6 colours"),
    Concept("mushroom", "object", "class", description="mushroom with a plain cap in one of the 6 colours"),
    Concept("outline", "style", "class", description="thin dark outlines around every colour edge, colours kept"),
    Concept("mosaic", "style", "class", description="square blocks of 2, 3 or 6 pixels, colours kept"),
    Concept("checker", "background", "class", description="checkerboard of a background colour and its darker tone"),
    Concept("night", "background", "class", description="dark blue sky with small round white stars"),
)

IDENTITIES: tuple[Concept, ...] = (
    Concept("zorbo", "character", "identity", "robot", "silver robot, cyan visor, red antenna ball, yellow bolt on its chest"),
    Concept("kwibbit", "character", "identity", "frog", "mint frog with orange back spots, yellow belly, big eyes, red mouth"),
    Concept("bloopo", "character", "identity", "ghost", "lavender ghost with pink cheeks and a blue bow"),
    Concept("hattock", "object", "identity", "hat", "black top hat with a red band"),
    Concept("shroomel", "object", "identity", "mushroom", "tall red cap with big white spots, a ring on the stem"),
    Concept("inkvel", "style", "identity", "outline", "thick black outlines and flat posterized cream-tinted colours"),
    Concept("pixlor", "style", "identity", "mosaic", "4-pixel blocks in a four-colour palette: navy, purple, orange, yellow"),
    Concept("chekka", "background", "identity", "checker", "teal and navy checkerboard of 8-pixel cells"),
    Concept("nocturo", "background", "identity", "night", "navy-to-purple sky, yellow four-point stars, a crescent moon"),
)

CONCEPTS: dict[str, Concept] = {c.name: c for c in GENERIC + CLASSES + IDENTITIES}
IDENTITY_OF_CLASS: dict[str, str] = {c.cls: c.name for c in IDENTITIES}

# Caption words beyond the concept names (colour words, "background", "style", joiners, common prompt words).
VOCAB: tuple[str, ...] = tuple(
    dict.fromkeys(
        [*SHAPES, *SHAPE_COLORS, *BACKGROUND_COLORS, *GENERIC_BACKGROUNDS]
        + [c.name for c in CLASSES] + [c.name for c in IDENTITIES]
        + ["background", "style", "and", "with", "a", "photo", "picture", "image", "drawing", "in", "on", "of",
           "the", "high", "quality"]
    )
)


def get_concept(name: str) -> Concept:
    """The v2 concept called ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name in CONCEPTS:
        return CONCEPTS[name]
    raise ValueError(f"unknown toy-world v2 concept {name!r}; known: {', '.join(CONCEPTS)}")


def concepts_of(kind: str | None = None, role: str | None = None) -> list[Concept]:
    """Concepts of one kind and/or role (``generic``, ``class``, ``identity``)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown concept kind {kind!r}; expected one of {KINDS}")
    return [c for c in CONCEPTS.values() if (kind is None or c.kind == kind) and (role is None or c.role == role)]
