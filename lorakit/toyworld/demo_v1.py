"""Toy world v1's side of ``lorakit demo`` (32x32 images; concepts named as in :mod:`lorakit.toyworld.concepts`):
the world object :class:`V1World` that :mod:`lorakit.toyworld.demo` asks for concepts, the prompt, the target
images, the LoRAs and the oracle (toy world v2's is :data:`lorakit.toyworld.v2.demo.WORLD`)."""

from __future__ import annotations

import time
from pathlib import Path

from lorakit.resources import data_path
from lorakit.toyworld.concepts import SHAPES, Concept, concepts_of_kind, get_concept
from lorakit.toyworld.evaluate import concept_prompts
from lorakit.toyworld.loras import train_concept_lora
from lorakit.toyworld.oracle import score
from lorakit.toyworld.render import Scene, caption, render

ENLARGE = 4  # v1's reports show images this many times larger (nearest neighbour: pixels stay sharp)


def check_concept(value: str, kind: str, option: str) -> Concept:
    """The held-out concept of ``kind`` named by ``value`` (name or trigger word).

    Raises:
        ValueError: naming ``option`` and ``value`` when it is unknown, generic or of another kind, and listing
            the held-out concepts of ``kind``.
    """
    choices = ", ".join(f"{c.name} ({c.trigger})" for c in concepts_of_kind(kind, heldout=True))
    try:
        c = get_concept(value)
    except ValueError:
        raise ValueError(f"{option} {value!r}: no such toy-world concept; held-out {kind}s: {choices} "
                         "(`lorakit toyworld list` shows all concepts)") from None
    if c.kind != kind or not c.heldout:
        what = f"a {'held-out' if c.heldout else 'generic'} {c.kind}"
        raise ValueError(f"{option} {value!r} is {what}, not a held-out {kind}; held-out {kind}s: {choices}")
    return c


def demo_prompt(character: str, style: str) -> str:
    """The toy caption of the character on a white plain background in the style, e.g.
    ``"kwibbit, white plain background, inkvel"`` (the form of the LoRAs' training captions)."""
    return caption(Scene(characters=(character,), style=style))


def target_images(row: str, character: str, style: str, seeds: list[int]) -> list:
    """The renderer's ground truth for a target row, one 32x32 PIL image per seed (layout jitter = the seed)."""
    if row == f"{character}_target":
        scenes = [Scene(characters=(character,), seed=sd) for sd in seeds]
    elif row == f"{style}_target":
        scenes = [Scene(shape=SHAPES[sd % len(SHAPES)], shape_color="red", style=style, seed=sd) for sd in seeds]
    elif row == "target":
        scenes = [Scene(characters=(character,), style=style, seed=sd) for sd in seeds]
    else:
        raise ValueError(f"unknown target row {row!r}; expected {character}_target, {style}_target or target")
    return [render(sc) for sc in scenes]


def train_loras(character: str, style: str, lora_dir: Path, train_steps: int | None = None,
                base: str | None = None, log=None) -> dict:
    """Train (or reuse, by recipe hash) both LoRAs. Returns ``{name: {"path", "cached", "seconds"}}``.

    ``log(message)`` (e.g. ``print``) hears which LoRA is trained or reused and where it is kept.
    """
    overrides = [f"max_steps={train_steps}"] if train_steps is not None else []
    out = {}
    for name in (character, style):
        before = set(lora_dir.glob("*.safetensors")) if lora_dir.exists() else set()
        if log:
            steps = f"{train_steps} steps" if train_steps is not None else "the recipe's steps"
            log(f"lorakit demo: {name} LoRA (train_configs/toy_{name}.yaml, {steps}): training unless cached "
                f"in {lora_dir}")
        t0 = time.perf_counter()
        path = train_concept_lora(name, lora_dir, base=base, overrides=overrides)
        out[name] = {"path": str(path), "cached": path in before, "seconds": round(time.perf_counter() - t0, 3)}
        if log:
            log(f"lorakit demo: {name} LoRA {'reused' if out[name]['cached'] else 'saved'}: {path}")
    return out


def _fusion_prompts(name: str, n: int = 4) -> list[str]:
    """Toy captions asking for one concept (as the LoRA was trained), for gradient fusion's statistics."""
    return concept_prompts(name, n, seed=0)


class V1World:
    """Toy world v1's side of the demo (32x32 images; concepts named as in :mod:`lorakit.toyworld.concepts`)."""

    name = "v1"
    image_size = 32
    enlarge = ENLARGE
    default_character = "frog"
    default_second = "ink"
    second_kinds = ("style",)
    default_scale = 1.0
    class_words = False  # the triggers stand alone (``kwibbit, white plain background, inkvel``)

    @staticmethod
    def base() -> str:
        return str(data_path("toy-base"))

    @staticmethod
    def check_concept(value: str, kind: str, option: str) -> str:
        return check_concept(value, kind, option).name

    @staticmethod
    def trigger(name: str) -> str:
        return get_concept(name).trigger

    @staticmethod
    def kind(name: str) -> str:
        return get_concept(name).kind

    @staticmethod
    def prompt(character: str, style: str) -> str:
        return demo_prompt(character, style)

    @staticmethod
    def target_images(row: str, character: str, style: str, seeds: list[int]) -> list:
        return target_images(row, character, style, seeds)

    @staticmethod
    def train_loras(character: str, style: str, lora_dir: Path, train_steps: int | None = None,
                    base: str | None = None, log=None, jobs: int = 1, pool=None, while_training=None) -> dict:
        return train_loras(character, style, lora_dir, train_steps, base, log)  # (one after the other)

    @staticmethod
    def fusion_prompts(name: str) -> tuple[list[str], list[str]]:
        return _fusion_prompts(name), concept_prompts(name, 2, seed=1)

    @staticmethod
    def score(images, names: list[str]):
        return score(images, names)
