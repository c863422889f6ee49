"""What ``lorakit demo --world v2`` needs from toy world v2: its identities, prompt, ground truth, LoRAs and oracle.

The demo itself (:mod:`lorakit.toyworld.demo`) is the same for both worlds; it asks a world object (this module's
:data:`WORLD`, or v1's) for the pieces below. v2 concepts are identities: a character (``kwibbit``, one particular
frog) and a second identity: an object (``hattock``), a style (``inkvel``) or a background (``nocturo``), each a LoRA
trained from ``train_configs/toy2_<identity>.yaml`` on the bundled ``data/toy2-base``. Images are 64x64.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import as_completed
from dataclasses import replace
from pathlib import Path

from lorakit.logs import library_chatter_off
from lorakit.toyworld.concepts import SHAPES
from lorakit.toyworld.v2.composition import set_render, set_scene, training_captions
from lorakit.toyworld.v2.concepts import IDENTITIES, get_concept
from lorakit.toyworld.v2.loras import lora_path, train_identity_lora
from lorakit.toyworld.v2.models import DEFAULT_BASE
from lorakit.toyworld.v2.oracle import Oracle
from lorakit.toyworld.v2.render import Scene, caption, render


def spawn_pool(workers: int):
    """A ``ProcessPoolExecutor`` of fresh (spawned) worker processes: torch is not fork-safe once loaded."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _train_quietly(name: str, lora_dir: str, base: str, overrides: list[str]) -> str:
    """One identity LoRA in a worker process, with the libraries' chatter off as in the demo's own process."""
    with library_chatter_off():
        return str(train_identity_lora(name, lora_dir, base, overrides))


class World:
    """Toy world v2's side of the demo (see :class:`lorakit.toyworld.demo_v1.V1World` for the other one)."""

    name = "v2"
    image_size = 64
    enlarge = 3  # the report shows 192 px images
    default_character = "kwibbit"
    default_second = "nocturo"
    second_kinds = ("object", "style", "background")
    default_scale = 0.8
    class_words = True  # every trigger stands next to its class word in the prompt (``kwibbit frog``)

    @staticmethod
    def base() -> str:
        return str(DEFAULT_BASE)

    @staticmethod
    def check_concept(value: str, kind: str, option: str) -> str:
        """The v2 identity of ``kind`` named ``value``; a ValueError naming ``option``, ``value`` and the choices
        otherwise."""
        choices = ", ".join(c.name for c in IDENTITIES if c.kind == kind)
        try:
            c = get_concept(value)
        except ValueError:
            raise ValueError(f"{option} {value!r}: no such toy world v2 concept; {kind} identities: "
                             f"{choices}") from None
        if c.kind != kind or c.role != "identity":
            raise ValueError(f"{option} {value!r} is a {c.kind} ({c.role}) of toy world v2, not {_a(kind)} identity; "
                             f"{kind} identities: {choices}")
        return c.name

    @staticmethod
    def trigger(name: str) -> str:
        return name  # a v2 identity's name is its trigger word

    @staticmethod
    def kind(name: str) -> str:
        return get_concept(name).kind

    @staticmethod
    def prompt(character: str, second: str) -> str:
        """The whole-scene caption the recipes train on, e.g. ``"kwibbit frog, white plain background, inkvel
        outline style"``, ``"kwibbit frog, hattock hat, white plain background"``."""
        return caption(set_scene({"character": character, get_concept(second).kind: second}))

    @staticmethod
    def target_images(row: str, character: str, second: str, seeds: list[int]) -> list:
        """The renderer's ground truth for a target row, one 64x64 image per seed (layout = the seed): the
        character alone; the second concept without it (a style on a generic shape, an object or a background
        alone); the prompt's scene."""
        kind = get_concept(second).kind
        if row == f"{character}_target":
            return [render(Scene(characters=(character,), seed=sd)) for sd in seeds]
        if row == f"{second}_target":
            if kind == "style":
                return [render(Scene(shape=SHAPES[sd % len(SHAPES)], style=second, seed=sd)) for sd in seeds]
            alone = replace(set_scene({"character": character, kind: second}), characters=())
            return [render(replace(alone, seed=sd)) for sd in seeds]
        if row == "target":
            return [set_render({"concepts": {"character": character, kind: second}}, sd) for sd in seeds]
        raise ValueError(f"unknown target row {row!r}")

    @staticmethod
    def train_loras(character: str, second: str, lora_dir: Path, train_steps: int | None = None,
                    base: str | None = None, log=None, jobs: int = 1, pool=None, while_training=None) -> dict:
        """Train (or reuse, by recipe hash) both identity LoRAs: ``{name: {"path", "cached", "seconds"}}``. With
        ``jobs`` >= 2 and both missing, the two train at once in two processes (one thread each; ``pool``, a
        spawn-context ``ProcessPoolExecutor`` of 2 workers, when given, else a new one), and each one's seconds
        are the wall time of both; ``while_training(name, path)``, if given, runs here as soon as the first of
        the two is saved, while the other still trains (the core the first one used is free then)."""
        base = str(base or World.base())
        overrides = [f"max_steps={train_steps}"] if train_steps is not None else []
        paths = {name: lora_path(name, lora_dir, base, overrides) for name in (character, second)}  # renders data
        todo = [name for name, path in paths.items() if not path.exists()]
        if log:
            for name, path in paths.items():
                steps = f"{train_steps} steps" if train_steps is not None else "the recipe's steps"
                log(f"lorakit demo: {name} LoRA (train_configs/toy2_{name}.yaml, {steps}): "
                    f"{'training' if name in todo else 'cached'} in {lora_dir}")
        seconds = dict.fromkeys(paths, 0.0)
        t0 = time.perf_counter()
        if len(todo) == 2 and jobs >= 2:
            with contextlib.ExitStack() as stack:
                pool = pool or stack.enter_context(spawn_pool(2))
                done = {pool.submit(_train_quietly, name, str(lora_dir), base, overrides): name for name in todo}
                first = next(as_completed(done))
                paths[done[first]] = Path(first.result())
                if while_training is not None:
                    while_training(done[first], str(paths[done[first]]))
                for future, name in done.items():
                    paths[name] = Path(future.result())
            seconds.update(dict.fromkeys(todo, round(time.perf_counter() - t0, 3)))
        else:
            for name in todo:
                t0 = time.perf_counter()
                paths[name] = train_identity_lora(name, lora_dir, base, overrides)
                seconds[name] = round(time.perf_counter() - t0, 3)
        if log:
            for name in todo:
                log(f"lorakit demo: {name} LoRA saved: {paths[name]}")
        return {name: {"path": str(path), "cached": name not in todo, "seconds": seconds[name]}
                for name, path in paths.items()}

    @staticmethod
    def fusion_prompts(name: str) -> tuple[list[str], list[str]]:
        """(captions for gradient fusion's statistics, other captions for its held-out ridge choice): the
        identity's own training captions, as the benchmark captures them."""
        caps = training_captions(name, 6)
        return caps[:4], caps[4:6]

    @staticmethod
    def score(images, names: list[str]):
        """The v2 oracle's :class:`~lorakit.toyworld.oracle.OracleScores` of ``names`` on ``images``."""
        return _oracle().score(images, names)


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


_ORACLE = []  # loaded once per process


def _oracle():
    if not _ORACLE:
        _ORACLE.append(Oracle.load())
    return _ORACLE[0]


WORLD = World()

__all__ = ["WORLD", "World"]
