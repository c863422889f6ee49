"""Measure toy world v2 with its oracle: the base's prompt following, and whether an identity's LoRA acts like
a real one (present with its trigger, absent without it, the base's prompt following kept).

Every row is a JSON-able dict with rates as ``{"rate", "k", "n", "wilson95"}`` and, where LoRA-on and LoRA-off
images share prompts and seeds, a paired McNemar test. ``tools/measure_toyworld.py --world v2`` prints them.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from lorakit.eval.stats import paired, rate
from lorakit.models import load_base
from lorakit.toyworld.evaluate import GUIDANCE, NUM_STEPS, generate, generic_prompts
from lorakit.toyworld.v2.evaluate import (
    found_by_kind,
    identity_prompts,
    identity_scene_pairs,
    world_prompts,
)
from lorakit.toyworld.v2.image_store import StoredPipe, pipeline_tag
from lorakit.toyworld.v2.loras import train_identity_lora
from lorakit.toyworld.v2.render import Scene, render

# Prompt and image seeds of every v2 measurement (the same for the base and every LoRA, so rows pair up).
GENERIC_PROMPT_SEED = 7
WORLD_PROMPT_SEED = 2026
IDENTITY_PROMPT_SEED = 123
IMAGE_SEED = 1000
SIZE = 64

# The goals for a concept LoRA at scale 0.8.
PRESENCE_GOAL = 0.8
LEAK_GOAL = 0.15
FOLLOWING_TOLERANCE = 0.05


def images(pipe, prompts: list[str]) -> list:
    return generate(pipe, prompts, seed=IMAGE_SEED, steps=NUM_STEPS, guidance=GUIDANCE, height=SIZE, width=SIZE)


def base_following(pipe, oracle, n: int, cache: dict | None = None) -> list[dict]:
    """Rows ``generic`` (``red circle, cyan plain background``: shape / colour / background / all three found)
    and ``world`` (``n`` random class-world captions: per concept kind, and every captioned concept found)."""
    cache = {} if cache is None else cache
    asked = generic_prompts(n, seed=GENERIC_PROMPT_SEED)
    gen = cached(cache, ("generic", n), pipe, [p for p, _ in asked])
    probs = oracle.score(gen).per_image()
    verdicts = {k: [probs[i][want[k]] >= 0.5 for i, (_, want) in enumerate(asked)]
                for k in ("shape", "color", "background")}
    verdicts["all"] = [all(v[i] for v in verdicts.values()) for i in range(n)]
    head = {"measure": "v2_base_following", "n": n, "steps": NUM_STEPS, "guidance": GUIDANCE}
    rows = [{**head, "prompts": "generic", "example_prompt": asked[0][0],
             **{k: rate(sum(v), len(v)) for k, v in verdicts.items()}}]
    world = world_prompts(n, seed=WORLD_PROMPT_SEED)
    wimg = cached(cache, ("world", n), pipe, [p for p, _ in world])
    by_kind = found_by_kind([s for _, s in world], oracle.probabilities(wimg), oracle.concepts)
    rows.append({**head, "prompts": "world", "example_prompt": world[0][0],
                 **{k: rate(sum(v), len(v)) for k, v in sorted(by_kind.items())}})
    return rows


def vae_round_trip(vae, imgs: list) -> list:
    """PIL images through ``vae`` (posterior mean, no noise) and back to PIL."""
    import numpy as np
    import torch
    from PIL import Image

    x = torch.from_numpy(np.stack([np.asarray(i) for i in imgs])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return [Image.fromarray(((r.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for r in y]


def oracle_ceiling(vae, oracle, n: int) -> list[dict]:
    """:func:`base_following`'s rows on the renderer's own images of the same prompts, raw and through the
    base's VAE: what a perfect base would score (the measurement's ceiling)."""
    asked = generic_prompts(n, seed=GENERIC_PROMPT_SEED)
    scenes = [Scene(shape=w["shape"], shape_color=w["color"], background=w["background"],
                    bg_color=p.split(", ")[1].split()[0], seed=i) for i, (p, w) in enumerate(asked)]
    world = world_prompts(n, seed=WORLD_PROMPT_SEED)
    rows = []
    for source, f in (("render", lambda x: x), ("vae_round_trip", lambda x: vae_round_trip(vae, x))):
        probs = oracle.score(f([render(s) for s in scenes])).per_image()
        verdicts = {k: [probs[i][w[k]] >= 0.5 for i, (_, w) in enumerate(asked)] for k in ("shape", "color",
                                                                                            "background")}
        verdicts["all"] = [all(v[i] for v in verdicts.values()) for i in range(n)]
        head = {"measure": "v2_oracle_ceiling", "images": source, "n": n}
        rows.append({**head, "prompts": "generic", **{k: rate(sum(v), n) for k, v in verdicts.items()}})
        wimg = f([render(s) for _, s in world])
        by_kind = found_by_kind([s for _, s in world], oracle.probabilities(wimg), oracle.concepts)
        rows.append({**head, "prompts": "world", **{k: rate(sum(v), len(v)) for k, v in sorted(by_kind.items())}})
    return rows


def identity_ceiling(vae, oracle, identity: str, n: int) -> list[dict]:
    """The oracle on the renderer's images of :func:`identity_following`'s ``presence`` and ``leak_class`` scenes
    (the same ``n`` scenes), raw and through the base's VAE: the presence a perfect LoRA would score, and the
    class leak the oracle itself gives (identity found on perfect images of the class)."""
    pairs = identity_scene_pairs(identity, n, seed=IDENTITY_PROMPT_SEED)
    rows = []
    for source, f in (("render", lambda x: x), ("vae_round_trip", lambda x: vae_round_trip(vae, x))):
        row = {"measure": "v2_identity_ceiling", "identity": identity, "images": source, "n": n}
        for name, scenes in (("presence", [s for s, _ in pairs]), ("leak_class", [c for _, c in pairs])):
            found = oracle.score(f([render(s) for s in scenes]), [identity]).present[:, 0]
            row[name] = rate(int(found.sum()), n)
        rows.append(row)
    return rows


def cached(cache: dict, key, pipe, prompts: list[str]) -> list:
    """The base's images for ``prompts`` (kept in ``cache`` under ``key``: every LoRA is compared to the same)."""
    if key not in cache:
        cache[key] = images(pipe, prompts)
    return cache[key]


def identity_following(identity: str, base_pipe, lora_pipe, oracle, n: int, scale: float,
                       cache: dict | None = None) -> list[dict]:
    """Rows for one identity's LoRA (already loaded in ``lora_pipe`` at ``scale``) against ``base_pipe``, the
    same prompts and seeds:

    * ``presence``: the identity found, its trigger in training-caption-like prompts (goal >= 0.8);
    * ``leak_class``: the identity found when the prompt names its class instead (``green frog``; goal <= 0.15);
    * ``leak_world``: the identity found on random class-world captions;
    * ``following_world``: per concept kind, the captioned concepts found on those captions, LoRA vs base
      (goal: within 0.05 of the base), paired;
    * ``summary``: each goal met or not (leak: both leak rows).
    """
    cache = {} if cache is None else cache
    triples = identity_prompts(identity, n, seed=IDENTITY_PROMPT_SEED)
    trig, cls = [t for t, _, _ in triples], [c for _, c, _ in triples]
    world = world_prompts(n, seed=WORLD_PROMPT_SEED)
    base = {"trigger": cached(cache, ("trigger", identity, n), base_pipe, trig),
            "class": cached(cache, ("class", identity, n), base_pipe, cls),
            "world": cached(cache, ("world", n), base_pipe, [p for p, _ in world])}
    lora = {"trigger": images(lora_pipe, trig), "class": images(lora_pipe, cls),
            "world": images(lora_pipe, [p for p, _ in world])}

    def found(imgs):
        return [bool(v) for v in oracle.score(imgs, [identity]).present[:, 0]]

    head = {"measure": "v2_identity_following", "identity": identity, "scale": scale, "n": n}
    rows = []
    for row, key, example in (("presence", "trigger", trig[0]), ("leak_class", "class", cls[0]),
                              ("leak_world", "world", world[0][0])):
        b, l = found(base[key]), found(lora[key])
        rows.append({**head, "row": row, "example_prompt": example, "base": rate(sum(b), n), "lora": rate(sum(l), n),
                     "lora_vs_base": paired(l, b)})
    scenes = [s for _, s in world]
    kb = found_by_kind(scenes, oracle.probabilities(base["world"]), oracle.concepts)
    kl = found_by_kind(scenes, oracle.probabilities(lora["world"]), oracle.concepts)
    worst = 0.0
    for kind in sorted(kb):
        b, l = kb[kind], kl[kind]
        worst = max(worst, (sum(b) - sum(l)) / len(b))
        rows.append({**head, "row": f"following_world_{kind}", "base": rate(sum(b), len(b)),
                     "lora": rate(sum(l), len(l)), "lora_vs_base": paired(l, b)})
    presence, leak, leak_world = (rows[i]["lora"]["rate"] for i in range(3))
    rows.append({**head, "row": "summary", "presence": presence, "presence_ok": presence >= PRESENCE_GOAL,
                 "leak_class": leak, "leak_world": leak_world, "leak_ok": max(leak, leak_world) <= LEAK_GOAL,
                 "largest_following_drop": round(worst, 3), "following_ok": worst <= FOLLOWING_TOLERANCE})
    return rows


def load_pipeline(path: str | Path):
    pipe = load_base(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stored(pipe, store: Path | None, tag: str, deadline: float | None):
    """``pipe`` itself, or (with a ``store`` folder) a :class:`~lorakit.toyworld.v2.image_store.StoredPipe` keeping
    its images under ``store/tag`` and stopping at ``deadline`` (``time.monotonic()``)."""
    if store is None:
        return pipe

    return StoredPipe(pipe, Path(store) / tag, deadline)


def measure_identities(identities: list[str], base: str | Path, oracle, n: int, scale: float, work: Path,
                       overrides: list[str] | None = None, emit=None, cache: dict | None = None,
                       store: Path | None = None, deadline: float | None = None) -> list[dict]:
    """Train (or reuse) each identity's recipe LoRA on ``base`` and return (and ``emit``) its rows; ``cache``
    keeps the base's images (shared with :func:`base_following`). With ``store``, every image is kept on disk
    and the run raises :class:`~lorakit.toyworld.v2.image_store.OutOfTime` before passing ``deadline``; the
    same call again continues it."""
    base_pipe = load_pipeline(base)
    if store is not None:
        base_pipe = stored(base_pipe, store, pipeline_tag(base), deadline)
    cache = {} if cache is None else cache
    out = []
    for identity in identities:
        with contextlib.redirect_stdout(sys.stderr):  # the trainer's summary; stdout carries the rows
            path = train_identity_lora(identity, work, base, overrides)
        lora_pipe = load_pipeline(base)
        lora_pipe.load_lora_weights(str(path), adapter_name=identity)
        lora_pipe.set_adapters([identity], [scale])
        if store is not None:
            lora_pipe = stored(lora_pipe, store, pipeline_tag(base, path, scale), deadline)
            lora_pipe.last_batch_s = base_pipe.last_batch_s  # the same cost per batch: stop before the first one too
        rows = identity_following(identity, base_pipe, lora_pipe, oracle, n, scale, cache)
        for r in rows:
            r["adapter"] = str(path)
            if emit:
                emit(r)
        out += rows
    return out
