"""Measure the toy world: does the base follow generic prompts, and does each held-out concept's LoRA make the
oracle find that concept far more often than the base alone? Prints JSON lines (one per measurement).

    python tools/measure_toyworld.py                      # base prompt-following + every held-out concept
    python tools/measure_toyworld.py --concepts robot ink --steps 100 --n 32

For each concept: train its recipe ``train_configs/toy_<concept>.yaml`` (``--steps`` overrides max_steps) with
the block-wise trainer, generate ``--n`` images from prompts that name the concept's trigger (same prompts and
seeds with and without the LoRA), score them with the oracle.

``--follow`` measures instead whether each concept's LoRA (at ``--scale``, default 0.8) still honours the prompt,
on ``--n`` images per row, the same prompts and seeds with and without the LoRA:

* ``presence``: the concept with its trigger in training-caption prompts;
* ``leak``: the concept when the prompt names only generic things (``red circle, cyan plain background``);
* ``generic_following``: shape / colour / background kind of those generic prompts, LoRA on vs off (paired);
* ``plain_white``: ``<trigger>, white plain background`` (the demo's form): how often the oracle finds a plain
  background (LoRA vs the base on the same prompt, and the base on ``white plain background`` alone), and
  how often the concept is there.

    python tools/measure_toyworld.py --follow --concepts frog ink --n 64 --threads 1

``--world v2`` measures toy world v2 instead (``--base``: a v2 pipeline, ``--oracle``: a v2 oracle folder; the
rows are made by :mod:`lorakit.toyworld.v2.measure`): the base's prompt following (``--concepts none``), and per
identity (``kwibbit``...) its recipe ``train_configs/toy2_<identity>.yaml`` trained on that base and measured
as ``--follow`` does, with the class prompt (``red frog`` for ``kwibbit frog``) as the hardest leak test:

    python tools/measure_toyworld.py --world v2 --base PIPELINE --oracle ORACLE --concepts kwibbit --n 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="the base pipeline (default: data/toy-base; --world v2: data/toy2-base)")
    p.add_argument("--concepts", nargs="*", help="held-out concepts (default: all); 'none' for the base only")
    p.add_argument("--steps", type=int, help="override each recipe's max_steps")
    p.add_argument("--n", type=int, default=32, help="images per measurement")
    p.add_argument("--n-generic", type=int, default=64, help="generic prompts for the base measurement (0: skip)")
    p.add_argument("--work", default="artifacts/adapters",
                   help="LoRA cache folder (lorakit.toyworld.loras: reused when recipe, base and data are unchanged)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--follow", action="store_true", help="measure prompt following with each LoRA (see above)")
    p.add_argument("--scale", type=float, default=0.8, help="LoRA scale for --follow (default 0.8)")
    p.add_argument("--no-plain", action="store_true", help="--follow without the plain_white_background row")
    p.add_argument("--world", choices=("v1", "v2"), default="v1", help="toy world (v2: see above)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="--world v2: recipe overrides for every identity (as tools/train_toy2_loras.py --set)")
    p.add_argument("--oracle", help="--world v2: the v2 oracle folder (default: data/toy2-oracle)")
    p.add_argument("--ceiling", action="store_true",
                   help="--world v2: also score the renderer's images of the base prompts and of each identity's "
                   "presence and class-leak scenes (raw and through the VAE): what a perfect model would score")
    p.add_argument("--image-store", help="--world v2: keep every generated image in this folder, so that a run "
                   "stopped by --budget-s continues where it stopped when run again")
    p.add_argument("--budget-s", type=float, help="--world v2 with --image-store: stop (exit status 3) before a batch "
                   "of images would end later than this many seconds after the start")
    return p.parse_args(argv)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def base_prompt_following(base: str, n: int) -> dict:
    """Oracle rates of the prompted shape / colour / background kind over ``n`` generic prompts."""
    from lorakit.models import load_base
    from lorakit.toyworld.evaluate import GUIDANCE, NUM_STEPS, generate, generic_prompts
    from lorakit.toyworld.oracle import score

    pipe = load_base(base)
    pipe.set_progress_bar_config(disable=True)
    asked = generic_prompts(n, seed=7)
    t0 = time.perf_counter()
    images = generate(pipe, [p for p, _ in asked], seed=0)
    per_image_s = (time.perf_counter() - t0) / n
    probs = score(images).per_image()
    hits = {k: sum(probs[i][want[k]] >= 0.5 for i, (_, want) in enumerate(asked)) / n
            for k in ("shape", "color", "background")}
    allok = sum(all(probs[i][want[k]] >= 0.5 for k in want) for i, (_, want) in enumerate(asked)) / n
    return {"measure": "base_prompt_following", "n": n, "steps": NUM_STEPS, "guidance": GUIDANCE,
            **{f"{k}_rate": round(v, 3) for k, v in hits.items()}, "all_three_rate": round(allok, 3),
            "seconds_per_image_batched": round(per_image_s, 3)}


def lora_vs_base(concept: str, base: str, steps: int | None, n: int, work: Path) -> dict:
    """Train ``concept``'s recipe (or reuse the cached LoRA), then oracle presence of the concept with/without it."""
    from lorakit.adapters.io import load_adapter
    from lorakit.models import load_base
    from lorakit.toyworld.evaluate import concept_prompts, generate
    from lorakit.toyworld.loras import train_concept_lora
    from lorakit.toyworld.oracle import score

    t0 = time.perf_counter()
    path = train_concept_lora(concept, work, base=base, overrides=[f"max_steps={steps}"] if steps else None)
    train_s = time.perf_counter() - t0
    cfg = json.loads(load_adapter(path).metadata.get("lorakit.config", "{}"))
    pipe = load_base(base)
    pipe.set_progress_bar_config(disable=True)
    prompts = concept_prompts(concept, n, seed=123)
    base_rate = score(generate(pipe, prompts, seed=1000), [concept]).rates[concept]
    pipe.load_lora_weights(str(path), adapter_name=concept)
    lora_rate = score(generate(pipe, prompts, seed=1000), [concept]).rates[concept]
    net = cfg.get("network", {})
    return {"measure": "lora_vs_base", "concept": concept, "trigger": cfg.get("trigger"), "blocks": str(net.get("blocks")),
            "rank": net.get("rank"), "train_steps": cfg.get("max_steps"), "train_seconds": round(train_s, 1),
            "adapter": str(path), "n": n, "base_rate": round(base_rate, 3), "lora_rate": round(lora_rate, 3),
            "example_prompt": prompts[0]}


def prompt_following(concept: str, base: str, n: int, scale: float, work: Path, plain: bool = True,
                     base_cache: dict | None = None) -> list[dict]:
    """Does ``concept``'s LoRA at ``scale`` keep the base's prompt following? (see the module doc). ``plain=False``
    skips the ``plain_white_background`` row; ``base_cache`` keeps the base's generic images between concepts
    (same prompts and seeds for every concept)."""
    path, asked, prompts, base_img, lora_img = _following_images(concept, base, n, scale, work, plain, base_cache)
    head = {"measure": "prompt_following", "concept": concept, "trigger": prompts["trigger_word"], "scale": scale,
            "n": n, "adapter": str(path)}
    return _following_rows(head, concept, n, plain, asked, prompts, base_img, lora_img)


def _following_images(concept: str, base: str, n: int, scale: float, work: Path, plain: bool,
                      base_cache: dict | None):
    """The images :func:`prompt_following` scores: the base's and the LoRA's, per prompt set (same seeds)."""
    from lorakit.models import load_base
    from lorakit.toyworld.concepts import get_concept
    from lorakit.toyworld.evaluate import concept_prompts, generate, generic_prompts
    from lorakit.toyworld.loras import train_concept_lora

    c = get_concept(concept)
    path = train_concept_lora(concept, work, base=base)
    pipe = load_base(base)
    pipe.set_progress_bar_config(disable=True)
    asked = generic_prompts(n, seed=7)
    generic = [p for p, _ in asked]
    with_trigger = concept_prompts(concept, n, seed=123)
    plain_prompts = [f"{c.trigger}, white plain background"] * n
    seed = 1000
    cache = base_cache if base_cache is not None else {}
    for key, prompts in (("generic", generic), ("plain_no_trigger", ["white plain background"] * n)):
        if (key, n) not in cache and (plain or key == "generic"):
            cache[(key, n)] = generate(pipe, prompts, seed=seed)
    base_img = {"generic": cache[("generic", n)], "trigger": generate(pipe, with_trigger, seed=seed)}
    rows = [("generic", generic), ("trigger", with_trigger)]
    if plain:
        base_img.update(plain=generate(pipe, plain_prompts, seed=seed), plain_no_trigger=cache[("plain_no_trigger", n)])
        rows.append(("plain", plain_prompts))
    pipe.load_lora_weights(str(path), adapter_name=concept)
    pipe.set_adapters([concept], [scale])
    lora_img = {k: generate(pipe, p, seed=seed) for k, p in rows}
    prompts = {"generic": generic, "trigger": with_trigger, "plain": plain_prompts, "trigger_word": c.trigger}
    return path, asked, prompts, base_img, lora_img


def _following_rows(head: dict, concept: str, n: int, plain: bool, asked, prompts: dict, base_img: dict,
                    lora_img: dict) -> list[dict]:
    """:func:`prompt_following`'s rows from its images, scored by the oracle."""
    from lorakit.eval.stats import paired, rate
    from lorakit.toyworld.oracle import score

    def present(images, name):
        return [bool(v) for v in score(images, [name]).present[:, 0]]

    out = []
    b, l = present(base_img["trigger"], concept), present(lora_img["trigger"], concept)
    out.append({**head, "row": "presence", "example_prompt": prompts["trigger"][0], "base": rate(sum(b), n),
                "lora": rate(sum(l), n)})
    b, l = present(base_img["generic"], concept), present(lora_img["generic"], concept)
    out.append({**head, "row": "leak", "example_prompt": prompts["generic"][0], "base": rate(sum(b), n),
                "lora": rate(sum(l), n)})
    pb, pl = score(base_img["generic"]).per_image(), score(lora_img["generic"]).per_image()
    for key in ("shape", "color", "background", "all"):
        def ok(probs, i):
            keys = ("shape", "color", "background") if key == "all" else (key,)
            return all(probs[i][asked[i][1][k]] >= 0.5 for k in keys)

        vb, vl = [ok(pb, i) for i in range(n)], [ok(pl, i) for i in range(n)]
        out.append({**head, "row": f"generic_following_{key}", "base": rate(sum(vb), n), "lora": rate(sum(vl), n),
                    "lora_vs_base": paired(vl, vb)})
    if not plain:
        return out
    vb, vl = present(base_img["plain"], "plain"), present(lora_img["plain"], "plain")
    vn = present(base_img["plain_no_trigger"], "plain")
    out.append({**head, "row": "plain_white_background", "example_prompt": prompts["plain"][0],
                "base": rate(sum(vb), n), "lora": rate(sum(vl), n), "base_without_trigger": rate(sum(vn), n),
                "lora_vs_base": paired(vl, vb), "stripes_lora": rate(sum(present(lora_img["plain"], "stripes")), n),
                "concept_lora": rate(sum(present(lora_img["plain"], concept)), n)})
    return out


def main_v2(args) -> int:
    """``--world v2``: the base's prompt following (always), then each identity's LoRA (``--concepts``, default
    all; ``none`` for the base only)."""
    # Bad arguments fail before the slow imports below.
    from lorakit.resources import data_path

    args.base = args.base or str(data_path("toy2-base"))
    if args.budget_s is not None and not args.image_store:
        raise ValueError("--budget-s needs --image-store (where the images made before the stop are kept)")
    is_v1 = Path(args.base).resolve() == data_path("toy-base").resolve()
    if is_v1 or not Path(args.base, "model_index.json").exists():
        raise FileNotFoundError(f"--base {args.base}: --world v2 needs a v2 pipeline folder (model_index.json), "
                                "e.g. data/toy2-base or <work>/unet/toy-unet-stepNNNNNN from tools/train_toy_base_v2.py")
    from lorakit.toyworld.v2.concepts import IDENTITIES
    from lorakit.toyworld.v2.image_store import OutOfTime, pipeline_tag
    from lorakit.toyworld.v2.loras import identity_name
    from lorakit.toyworld.v2.measure import (
        base_following,
        identity_ceiling,
        load_pipeline,
        measure_identities,
        oracle_ceiling,
        stored,
    )
    from lorakit.toyworld.v2.oracle import Oracle

    oracle = Oracle.load(args.oracle)
    names = [c.name for c in IDENTITIES] if args.concepts is None else [c for c in args.concepts if c != "none"]
    names = [identity_name(c) for c in names]  # unknown names fail here, before any image is made
    store = Path(args.image_store) if args.image_store else None
    deadline = time.monotonic() + args.budget_s if args.budget_s is not None else None
    cache: dict = {}  # the base's images, shared by the rows that use the same prompts
    try:
        if args.n_generic:
            pipe = stored(load_pipeline(args.base), store, pipeline_tag(args.base), deadline)
            rows = oracle_ceiling(pipe.vae, oracle, args.n_generic) if args.ceiling else []
            for row in rows + base_following(pipe, oracle, args.n_generic, cache):
                emit(row)
        if args.ceiling and names:
            vae = load_pipeline(args.base).vae
            for name in names:
                for row in identity_ceiling(vae, oracle, name, args.n):
                    emit(row)
        measure_identities(names, args.base, oracle, args.n, args.scale, Path(args.work),
                           ([f"max_steps={args.steps}"] if args.steps else []) + args.set or None, emit, cache, store,
                           deadline)
    except OutOfTime as err:
        print(f"measure_toyworld: {err}; run the same command again to continue", file=sys.stderr)
        return 3
    return 0


def main(argv=None) -> int:
    from lorakit.toyworld.concepts import HELDOUT

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.world == "v2":
        return main_v2(args)
    args.base = args.base or "data/toy-base"
    if args.n_generic and not args.follow:
        emit(base_prompt_following(args.base, args.n_generic))
    concepts = args.concepts if args.concepts is not None else [c.name for c in HELDOUT]
    concepts = [c for c in concepts if c != "none"]
    work = Path(args.work)
    if args.follow:
        cache: dict = {}
        for c in concepts:
            for rec in prompt_following(c, args.base, args.n, args.scale, work, not args.no_plain, cache):
                emit(rec)
        return 0
    for c in concepts:
        emit(lora_vs_base(c, args.base, args.steps, args.n, work))
    return 0


if __name__ == "__main__":
    from lorakit.errors import run_guarded

    raise SystemExit(run_guarded(main, "measure_toyworld"))
