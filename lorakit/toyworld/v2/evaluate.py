"""Prompts for measuring toy world v2: an identity's prompts with and without its trigger, and the base's world.

Images are generated with :func:`lorakit.toyworld.evaluate.generate` (image ``i`` seeded by ``seed + i``) at 64x64.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from lorakit.toyworld.concepts import SHAPE_COLORS
from lorakit.toyworld.v2.concepts import CONCEPTS
from lorakit.toyworld.v2.render import Scene, caption
from lorakit.toyworld.v2.scenes import class_scene, concept_scene


def as_class(scene: Scene, identity: str, colour: str) -> Scene:
    """``scene`` with ``identity`` replaced by an instance of its class (a class character gets ``colour``)."""
    cls = CONCEPTS[identity].cls
    kind = CONCEPTS[identity].kind
    if kind == "character":
        chars = tuple(cls if c == identity else c for c in scene.characters)
        colours = scene.char_colors or tuple(colour for _ in chars)
        return replace(scene, characters=chars, char_colors=colours)
    field = {"object": "hat" if cls == "hat" else "mushroom", "style": "style", "background": "background"}[kind]
    extra = {"hat_color": colour} if field == "hat" else {"mushroom_color": colour} if field == "mushroom" else {}
    return replace(scene, **{field: cls}, **extra)


def identity_scene_pairs(identity: str, n: int, seed: int = 0) -> list[tuple[Scene, Scene]]:
    """``n`` pairs ``(scene with the identity, the same scene with its class instead)``, the scenes of
    :func:`identity_prompts` (the same ``seed``, the same scenes)."""
    rng = np.random.default_rng(seed)
    colours = list(SHAPE_COLORS)
    out = []
    for _ in range(n):
        s = concept_scene(identity, rng)
        out.append((s, as_class(s, identity, colours[int(rng.integers(len(colours)))])))
    return out


def identity_prompts(identity: str, n: int, seed: int = 0) -> list[tuple[str, str, Scene]]:
    """``n`` triples ``(prompt with the trigger, the same prompt with the class instead, class scene)``, written
    like the identity's training captions: ``("kwibbit frog, cyan stripes background", "green frog, cyan stripes
    background", ...)``. The class prompt is the hardest leak test: the LoRA must leave other frogs alone."""
    return [(caption(s), caption(c), c) for s, c in identity_scene_pairs(identity, n, seed)]


def world_prompts(n: int, seed: int = 0) -> list[tuple[str, Scene]]:
    """``n`` random captions of the base's class world (no identity) with their scenes."""
    rng = np.random.default_rng(seed)
    scenes = [class_scene(rng) for _ in range(n)]
    return [(caption(s), s) for s in scenes]


def found_by_kind(scenes: list[Scene], probs, concepts: list[str], threshold: float = 0.5) -> dict[str, list[bool]]:
    """Per concept kind, one verdict per captioned concept of that kind (oracle probability >= threshold), and
    ``all``: one verdict per image (every captioned concept found). ``probs``: ``[N, len(concepts)]``."""
    out: dict[str, list[bool]] = {}
    every = []
    for s, p in zip(scenes, probs):
        found = {c: bool(p[concepts.index(c)] >= threshold) for c in sorted(s.concepts())}
        for c, ok in found.items():
            out.setdefault(CONCEPTS[c].kind, []).append(ok)
        every.append(all(found.values()))
    out["all"] = every
    return out
