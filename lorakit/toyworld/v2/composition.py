"""Composition sets of toy world v2 and their oracle verdicts (``tools/bench_composition.py --world v2``).

* **Plain sets**: one character identity plus one identity of each of N-1 of the kinds object / style /
  background (N = 2..4), prompted with the v2 caption of the scene they make
  (``kwibbit frog, hattock hat, nocturo night background``).
* **Two-character regional sets**: two character identities, the first in the left half, the second in the
  right half (boxes as ``(top, left, bottom, right)`` fractions); the global prompt names both, each half's
  prompt its own character. The oracle scores each half for its character (:func:`half_views`).

A set is ``{"id", "n", "concepts": {slot: identity}, "prompt"}``, regional sets with ``"regions"`` too: the
same form the v1 sets have, so the bench runs both worlds through one loop.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from lorakit.eval.stats import rate
from lorakit.sampling.regional import Region, RegionSpec
from lorakit.toyworld.composition_sets import CATEGORIES, concept_sets
from lorakit.toyworld.concepts import SHAPE_COLORS
from lorakit.toyworld.v2.concepts import IDENTITIES
from lorakit.toyworld.v2.evaluate import as_class
from lorakit.toyworld.v2.loras import DATA_N, DATA_SEED, lora_path
from lorakit.toyworld.v2.render import Scene, caption, render
from lorakit.toyworld.v2.scenes import concept_scene

HALVES = ((0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0))  # left, right: (top, left, bottom, right)
REGIONAL_SLOTS = ("left", "right")
# The two-character sets' group names in the bench's tables (where a plain set's group is its N): with the
# left / right regions, and the same pair on the global prompt alone (the baseline regions are measured against).
REGIONAL_GROUP = "2r"
GLOBAL_GROUP = "2g"


def identities_by_kind(available=None) -> dict[str, list[str]]:
    """``{kind: [identity names]}`` for character / object / style / background, in the concepts' order;
    with ``available``, only those names."""
    keep = None if available is None else set(available)
    return {k: [c.name for c in IDENTITIES if c.kind == k and (keep is None or c.name in keep)]
            for k in ("character", *CATEGORIES)}


def set_scene(concepts: dict[str, str]) -> Scene:
    """The scene a plain set's prompt describes (a white plain background unless the set has one)."""
    obj = concepts.get("object")
    hat = obj if obj and IDENTITY_CLASS[obj] == "hat" else None
    mush = obj if obj and IDENTITY_CLASS[obj] == "mushroom" else None
    return Scene(characters=(concepts["character"],), hat=hat, mushroom=mush, style=concepts.get("style"),
                 background=concepts.get("background", "plain"))


IDENTITY_CLASS = {c.name: c.cls for c in IDENTITIES}


def composition_sets(sizes=(2, 3, 4), per_size: int | None = None, seed: int = 0, available=None) -> list[dict]:
    """Every plain set of N = ``sizes`` identities (a character and one identity from each of N-1 of the other
    kinds), or a seeded sample of ``per_size`` per N; with ``available``, only sets of those identities.

    Raises:
        ValueError: for a size outside 2..4.
    """
    return [{"id": f"n{n}-" + "-".join(concepts.values()), "n": n, "concepts": concepts,
             "prompt": caption(set_scene(concepts))}
            for n, concepts in concept_sets(identities_by_kind(available), sizes, per_size, seed)]


def regional_sets(available=None, baseline: bool = True) -> list[dict]:
    """Every ordered pair of two different character identities as a regional set (``r2-<left>-<right>``) and,
    with ``baseline``, the same pair without regions (``g2-<left>-<right>``: the global prompt alone, which also
    names the left one first), both scored per half."""
    chars = identities_by_kind(available)["character"]
    out = []
    for left, right in itertools.permutations(chars, 2):
        prompts = [caption(Scene(characters=(c,))) for c in (left, right)]
        pair = {"concepts": {"left": left, "right": right}, "prompt": caption(Scene(characters=(left, right)))}
        out.append({"id": f"r2-{left}-{right}", "n": REGIONAL_GROUP, **pair,
                    "regions": [{"box": list(box), "prompt": p} for box, p in zip(HALVES, prompts)]})
        if baseline:
            out.append({"id": f"g2-{left}-{right}", "n": GLOBAL_GROUP, **pair})
    return out


def per_half(set_: dict) -> bool:
    """Whether a set is scored per half (the two-character sets, with or without regions)."""
    return list(set_["concepts"]) == list(REGIONAL_SLOTS)


def region_spec(set_: dict):
    """The :class:`lorakit.sampling.regional.RegionSpec` of a regional set (None for a plain set)."""
    if not set_.get("regions"):
        return None
    return RegionSpec(set_["prompt"], "", [Region(tuple(r["box"]), r["prompt"]) for r in set_["regions"]])


def training_captions(identity: str, n: int) -> list[str]:
    """The first ``n`` distinct captions of the identity's training set (the ones its recipe's data folder
    holds: :func:`lorakit.toyworld.v2.loras.ensure_data` renders the same scenes), without writing files."""
    rng = np.random.default_rng(DATA_SEED)
    caps = [caption(concept_scene(identity, rng)) for _ in range(DATA_N)]
    return list(dict.fromkeys(caps))[:n]


def find_adapters(folder: str | os.PathLike, base: str | os.PathLike, identities,
                  overrides: dict[str, list[str]] | None = None) -> dict[str, Path]:
    """``{identity: LoRA file}`` for each of ``identities`` whose recipe LoRA on ``base`` is in ``folder``
    (:func:`lorakit.toyworld.v2.loras.lora_path`, the training tool's path and hash); ``overrides``: recipe
    overrides per identity (``{"nocturo": ["max_steps=600"]}``, as ``train_toy2_loras.py --set`` trained it)."""
    found = {}
    for name in identities:
        path = lora_path(name, folder, base, (overrides or {}).get(name))
        if path.exists():
            found[name] = path
    return found


def sets_with_adapters(size: int, ids, folder: str | os.PathLike, base: str | os.PathLike) -> tuple[list[dict], dict]:
    """The composition sets of ``size`` named ``ids`` and ``{identity: recipe LoRA file}`` for their identities
    (:func:`find_adapters`), for the probe tools.

    Raises:
        ValueError: naming the unknown set ids, or the identities with no recipe LoRA in ``folder``.
    """
    sets = [s for s in composition_sets((size,)) if s["id"] in ids]
    unknown = sorted(set(ids) - {s["id"] for s in sets})
    if unknown:
        raise ValueError(f"--sets {' '.join(unknown)}: no such set of size {size}")
    names = sorted({n for s in sets for n in s["concepts"].values()})
    files = find_adapters(folder, base, names)
    if len(files) < len(names):
        raise ValueError(f"--adapters-dir {folder}: no recipe LoRA for {', '.join(n for n in names if n not in files)} "
                         "(tools/train_toy2_loras.py)")
    return sets, files


# ------------------------------------------------------------------------------------------------- scoring


def _border_colour(a: np.ndarray) -> np.ndarray:
    return np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0)


def half_views(image) -> list:
    """The left and the right half of ``image``, each pasted in the middle of a canvas of the image's size
    filled with the image's border colour (the background of a plain scene): what the oracle reads for the
    character of each half, centred as the single characters it was trained on."""
    from PIL import Image

    a = np.asarray(image.convert("RGB"), np.float32)
    h, w = a.shape[:2]
    fill = _border_colour(a)
    out = []
    for x0 in (0, w // 2):
        half = a[:, x0:x0 + w // 2]
        canvas = np.broadcast_to(fill, a.shape).copy()
        left = (w - half.shape[1]) // 2
        canvas[:, left:left + half.shape[1]] = half
        out.append(Image.fromarray(canvas.round().astype(np.uint8)))
    return out


def presence(oracle, images, concepts: dict[str, str], regional: bool = False) -> dict:
    """Oracle verdicts for one set's images, as v1's bench has them: ``all_present`` rate, ``per_category``
    rates and ``present`` (one ``[bool per slot]`` per image, in the set's slot order), plus the
    probabilities. A plain set asks for each identity in the whole image; a regional set asks for the left
    character in the left half and the right character in the right half."""
    slots, names = list(concepts), list(concepts.values())
    if regional:
        views = [half_views(img) for img in images]
        left = oracle.score([v[0] for v in views], names).probs
        right = oracle.score([v[1] for v in views], names).probs
        probs = np.stack([left[:, 0].detach().numpy(), right[:, 1].detach().numpy()], axis=1)
        # the other character where this one should be: a swap, not a miss
        extra = {"swapped": [bool(left[i, 1] >= 0.5 and right[i, 0] >= 0.5) for i in range(len(images))]}
    else:
        probs = oracle.score(images, names).probs.detach().numpy()
        extra = {}
    present = probs >= 0.5
    return {
        "all_present": float(present.all(axis=1).mean()),
        "per_category": {slot: float(present[:, i].mean()) for i, slot in enumerate(slots)},
        "present": [[bool(v) for v in row] for row in present],
        "probs": [[round(float(v), 4) for v in row] for row in probs],
        **extra,
    }


def slot_kinds(set_: dict) -> list[str]:
    """The adapter kind of each slot of a set (a regional set's two slots are characters)."""
    return ["character" if slot in REGIONAL_SLOTS else slot for slot in set_["concepts"]]


def set_render(set_: dict, seed: int):
    """The renderer's image of what a set asks for, with the layout of ``seed``."""
    if per_half(set_):
        return render(Scene(characters=tuple(set_["concepts"].values()), seed=seed))
    return render(replace(set_scene(set_["concepts"]), seed=seed))


def class_version(set_: dict, seed: int) -> tuple[Scene, dict[str, str]]:
    """A plain set with every identity replaced by its class, as the base knows it (``kwibbit frog, hattock hat,
    nocturo night background`` -> ``green frog, red hat, night background``), with the layout of ``seed``:
    ``(scene, {slot: class concept})``. Class characters and hats get colours drawn from ``seed``, so each image
    asks for other colours, as the base's training captions do."""
    rng, colours = np.random.default_rng(seed), list(SHAPE_COLORS)
    scene = replace(set_scene(set_["concepts"]), seed=seed)
    for identity in set_["concepts"].values():
        scene = as_class(scene, identity, colours[int(rng.integers(len(colours)))])
    return scene, {slot: IDENTITY_CLASS[name] for slot, name in set_["concepts"].items()}


def ceiling(oracle, sets: list[dict], seeds: list[int], transform=None) -> dict[str, dict]:
    """``{set id: all-present rate}`` of the renderer's own images of each set at ``seeds``, scored as the
    bench scores generated ones: the most any method can reach by the oracle (below 1 where the oracle misses
    an identity in combination, e.g. a character under a style that redraws its outline). ``transform`` (a list
    of PIL images -> a list of PIL images, e.g. a VAE round trip) is applied to the renders before scoring."""
    out = {}
    for s in sets:
        renders = [set_render(s, seed) for seed in seeds]
        verdict = presence(oracle, transform(renders) if transform else renders, s["concepts"], per_half(s))
        out[s["id"]] = rate(sum(all(v) for v in verdict["present"]), len(seeds))
    return out


def class_ceiling(oracle, sets: list[dict], seeds: list[int], images_of=None) -> dict[str, dict]:
    """``{set id: {"all_present": rate, "per_category": {slot: rate}}}`` of each plain set's class version
    (:func:`class_version`, one per seed), its class concepts scored by the oracle. ``images_of(scenes) ->
    images`` makes the images: by default the renderer's; the base's samples of the scenes' captions measure
    how often the base itself draws the set's N kinds of thing together when it knows every one of them."""
    out = {}
    for s in sets:
        scenes, classes = zip(*(class_version(s, seed) for seed in seeds))
        images = images_of(list(scenes)) if images_of else [render(sc) for sc in scenes]
        verdict = presence(oracle, images, classes[0])
        out[s["id"]] = {"all_present": rate(sum(all(v) for v in verdict["present"]), len(seeds)),
                        "per_category": {slot: rate(sum(v[i] for v in verdict["present"]), len(seeds))
                                         for i, slot in enumerate(classes[0])},
                        "classes": classes[0], "example_prompt": caption(scenes[0])}
    return out


def missing_inputs(args, sets: list[dict]) -> list[str]:
    """What a ``--world v2`` bench run needs and lacks, as readable lines: the v2 base, the v2 oracle and each
    set identity's recipe LoRA on that base (``args``: the bench's ``base``, ``oracle``, ``adapters_dir``,
    ``no_score``, ``methods``, ``lora_set``)."""
    import json

    missing = []
    base = Path(args.base)
    if not (base / "model_index.json").exists():
        missing.append(f"toy world v2 base {base} (a v2 pipeline folder, e.g. data/toy2-base or "
                       "tools/train_toy_base_v2.py's output; --base)")
    if not args.no_score:
        oracle = Path(args.oracle)
        try:
            world = json.loads((oracle / "config.json").read_text()).get("world")
        except (OSError, ValueError):
            world = None
        if world != "v2" or not (oracle / "oracle.safetensors").exists():
            missing.append(f"toy world v2 oracle in {oracle} (tools/train_oracle_v2.py; --oracle), or pass --no-score")
    hypernet = getattr(args, "hypernet", None)
    if "lorarar" in args.methods and not (hypernet and Path(hypernet).exists()):
        missing.append("--methods lorarar: a LoRA.rar hypernetwork trained on v2 LoRAs (--hypernet FILE, from "
                       "train_lorarar.py), or leave lorarar out")
    folder = Path(args.adapters_dir)
    need = sorted({c for s in sets for c in s["concepts"].values()})
    if (base / "model_index.json").exists():  # the LoRA paths hash the base: look for them only then
        sets_of = args.lora_set
        have = find_adapters(folder, base, need, sets_of)
        lacking = [c for c in need if c not in have]
        groups: dict[tuple, list[str]] = {}
        for c in lacking:  # one training command per recipe override
            groups.setdefault(tuple(sets_of.get(c, ())), []).append(c)
        for extra, names in groups.items():
            missing.append(f"v2 LoRAs in {folder} for {', '.join(names)} on base {base} (train them: python "
                           f"tools/train_toy2_loras.py --base {base} --out {folder} --identities {' '.join(names)}"
                           + (f" --set {' '.join(extra)})" if extra else ")"))
    return missing
