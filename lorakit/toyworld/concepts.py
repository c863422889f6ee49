"""The toy world's concepts: what can appear in a scene, the words that name it, and which set it is in.

Two disjoint sets:
  * **generic** concepts the bundled base model (``data/toy-base``) learns: 4 shapes, 6 shape colours,
    3 background kinds (each drawn in one of 5 background colours);
  * **held-out** concepts the base never sees, each with a nonsense trigger word: 3 characters, 2 objects,
    2 styles, 2 backgrounds. Only LoRAs learn them.

Every concept has a unique ``name`` (what the oracle scores and the CLI takes). Held-out concepts also have a
``trigger`` (the word that goes in captions); generic ones appear in captions through plain words.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("shape", "color", "background", "character", "object", "style")


@dataclass(frozen=True)
class Concept:
    """One toy-world concept.

    Attributes:
        name: unique id (``circle``, ``red``, ``robot``...).
        kind: one of ``shape``, ``color``, ``background``, ``character``, ``object``, ``style``.
        heldout: True for concepts only LoRAs learn.
        trigger: the caption word of a held-out concept (None for generic ones).
        description: what it looks like, for humans.
    """

    name: str
    kind: str
    heldout: bool
    trigger: str | None = None
    description: str = ""


# RGB of the generic shape colours.
SHAPE_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 180),
    "orange": (245, 130, 30),
}
# RGB of the generic background colours (these colour words are caption words, not scored concepts).
BACKGROUND_COLORS = {
    "white": (240, 240, 232),
    "gray": (150, 150, 150),
    "cyan": (150, 220, 230),
    "pink": (245, 180, 200),
    "sand": (225, 200, 150),
}
SHAPES = ("circle", "square", "triangle", "cross")
GENERIC_BACKGROUNDS = ("plain", "gradient", "stripes")

GENERIC: tuple[Concept, ...] = (
    *(Concept(s, "shape", False, description=f"a filled {s}") for s in SHAPES),
    *(Concept(c, "color", False, description=f"the generic shape is {c}") for c in SHAPE_COLORS),
    Concept("plain", "background", False, description="one flat background colour"),
    Concept("gradient", "background", False, description="vertical gradient from dark (top) to the colour"),
    Concept("stripes", "background", False, description="horizontal stripes of the colour and a darker tone"),
)

HELDOUT: tuple[Concept, ...] = (
    Concept("robot", "character", True, "zorbo", "gray box robot, cyan visor, red antenna ball, dark legs"),
    Concept("frog", "character", True, "kwibbit", "wide green frog, two white eyes with black pupils, red mouth"),
    Concept("ghost", "character", True, "bloopo", "lavender ghost with a wavy hem, black eyes, pink cheeks"),
    Concept("tophat", "object", True, "hattock", "black top hat with a red band (worn on a character's head)"),
    Concept("mushroom", "object", True, "shroomel", "red mushroom cap with white spots on a beige stem"),
    Concept("pixel", "style", True, "pixlor", "retro pixel art: 2x2 pixel blocks in a 4-level-per-channel palette"),
    Concept("ink", "style", True, "inkvel", "ink: thick black outlines and flat posterized colours"),
    Concept("checker", "background", True, "chekka", "teal and navy checkerboard"),
    Concept("starry", "background", True, "nocturo", "dark night sky with yellow and white stars"),
)

CONCEPTS: dict[str, Concept] = {c.name: c for c in GENERIC + HELDOUT}
BY_TRIGGER: dict[str, Concept] = {c.trigger: c for c in HELDOUT}

# Every word the toy tokenizer must know as one token (caption words, triggers, common prompt words).
VOCAB: tuple[str, ...] = tuple(
    dict.fromkeys(
        [*SHAPES, *SHAPE_COLORS, *BACKGROUND_COLORS, *GENERIC_BACKGROUNDS, "background", "and", "with", "a"]
        + [c.trigger for c in HELDOUT]
        + [c.name for c in HELDOUT]
    )
)


def get_concept(name_or_trigger: str) -> Concept:
    """The concept named ``name_or_trigger`` (its name or, for held-out concepts, its trigger word).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name_or_trigger in CONCEPTS:
        return CONCEPTS[name_or_trigger]
    if name_or_trigger in BY_TRIGGER:
        return BY_TRIGGER[name_or_trigger]
    raise ValueError(
        f"unknown toy-world concept {name_or_trigger!r}; known: {', '.join(CONCEPTS)} "
        f"(held-out triggers: {', '.join(BY_TRIGGER)})"
    )


def concepts_of_kind(kind: str, heldout: bool | None = None) -> list[Concept]:
    """Concepts of one kind, optionally only the held-out (True) or generic (False) ones."""
    if kind not in KINDS:
        raise ValueError(f"unknown concept kind {kind!r}; expected one of {KINDS}")
    return [c for c in CONCEPTS.values() if c.kind == kind and (heldout is None or c.heldout == heldout)]
