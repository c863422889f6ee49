"""Gradient fusion vs weighted average vs the reference recipe on the toy world, scored by the toy oracle.

For each pair of held-out toy concepts (``frog+ink``: their trained toy LoRAs, ``train_configs/toy_<c>.yaml``,
cached in ``--lora-dir``), one fused model per method:
  * ``gradient``: ``lorakit.fusion.gradient`` with its defaults (ridge chosen per layer on held-out captions and
    seeds, the reference's token rows, batched capture);
  * ``gradient_exact``: the previous recipe (ridge 1e-6, to_k/to_v fitted on the padded sequence), for comparison;
  * ``weighted``: ``W0 + (dW_a + dW_b) / 2``;
  * ``reference``: our re-implementation of the official routine (its own rows, LBFGS 500/50 iterations from W0;
    ``tools/bench_fuse.py``), on the same fit captions (the toy base does not know "photo of a <trigger>").
Fit captions: ``concept_prompts(c, 4, seed=0)`` per concept (lorakit's held-out ones: seed 1). Evaluation: ``--n``
captions asking for BOTH concepts (a scene with the character and the style or object, random generic
backgrounds, prompt rng seed 7), image seeds 5000.., never used by any fusion; 20 DDIM steps, guidance 4. The
oracle says which concepts each image shows. Per method: rates with Wilson 95% intervals; per pair of methods:
exact McNemar test on "both concepts shown" (same prompts and seeds: paired). JSON lines.

    python tools/measure_fusion_toy.py --pairs frog+ink --n 32 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_fuse import reference_solver  # noqa: E402
from measure_composition_methods import mcnemar_exact, wilson  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = ("gradient", "gradient_exact", "weighted", "reference")


def parse_method(spec: str) -> tuple[str, dict]:
    """``gradient+ridge_target=average`` -> (``gradient``, ``{"ridge_target": "average"}``)."""
    name, *opts = spec.split("+")
    if name not in METHODS:
        raise SystemExit(f"--methods {spec!r}: expected one of {METHODS}, optionally +key=value")
    kw = {}
    for opt in opts:
        k, _, v = opt.partition("=")
        try:
            kw[k] = float(v)
        except ValueError:
            kw[k] = v
    return name, kw


def eval_prompts(a: str, b: str, n: int, seed: int = 7) -> list[str]:
    """``n`` captions of scenes that show both concepts (character / object / style / background)."""
    from lorakit.toyworld.concepts import BACKGROUND_COLORS, GENERIC_BACKGROUNDS, get_concept
    from lorakit.toyworld.render import Scene, caption

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        kw = dict(background=str(rng.choice(GENERIC_BACKGROUNDS)), bg_color=str(rng.choice(list(BACKGROUND_COLORS))))
        for c in (get_concept(a), get_concept(b)):
            if c.kind == "character":
                kw["characters"] = kw.get("characters", ()) + (c.name,)
            elif c.kind == "object":
                kw["objects"] = kw.get("objects", ()) + (c.name,)
            elif c.kind == "style":
                kw["style"] = c.name
            else:
                kw["background"] = c.name
        out.append(caption(Scene(**kw)))
    return out


def fused_pipe(spec: str, base, adapters, names: list[str], threads_note: dict):
    """A copy of ``base`` holding method ``spec``'s fusion of ``adapters``; seconds go to ``threads_note[spec]``."""
    from lorakit.fusion.gradient import Concept, GradientSettings, fuse_gradient
    from lorakit.fusion.merge import apply_deltas, weighted
    from lorakit.toyworld.concepts import get_concept
    from lorakit.toyworld.evaluate import concept_prompts

    method, overrides = parse_method(spec)
    pipe = copy.deepcopy(base)
    t0 = time.perf_counter()
    common = dict(steps=20, samples=1, guidance=1.0, progress=False, **overrides)
    if method == "weighted":
        apply_deltas(pipe, weighted(adapters, combine="average"))
    else:
        concepts = []
        for ad, name in zip(adapters, names):
            fit = concept_prompts(name, 4, seed=0)
            val = concept_prompts(name, 4, seed=1) if method == "gradient" else []
            trig = get_concept(name).trigger if method == "gradient" else None
            concepts.append(Concept(name, ad, 1.0, fit, list(fit), val, list(val), trig))
        if method == "gradient":
            fuse_gradient(pipe, concepts, GradientSettings(**common))
        elif method == "gradient_exact":
            fuse_gradient(pipe, concepts, GradientSettings(**{**common, "ridge": 1e-6, "kv_rows": "all"}))
        else:
            from lorakit.fusion.gradient import build_problems

            base_w = {k: getattr(base, p.component).get_submodule(p.path).weight.detach().cpu()
                      for k, p in build_problems(base, concepts).items()}
            ref = GradientSettings(**{**common, "ridge": 0.0, "batch": 1, "keep_inputs": True, "kv_rows": "concept",
                                      "max_conv_dim": 10**9})  # the reference's rows (trigger=None: end token)
            fuse_gradient(pipe, concepts, ref,
                          solver=reference_solver(base_w, {}))
    threads_note[spec] = round(time.perf_counter() - t0, 2)
    return pipe


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", default=["frog+ink"], help="concept pairs a+b (held-out toy concepts)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    help=f"methods, each one of {METHODS} optionally with +key=value GradientSettings overrides "
                         "(e.g. gradient+ridge_target=average); the first is compared with every other")
    ap.add_argument("--n", type=int, default=32, help="evaluation images per method (one caption + seed each)")
    ap.add_argument("--lora-dir", default=str(REPO / "artifacts" / "adapters"))
    ap.add_argument("--base", default=str(REPO / "data" / "toy-base"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="also write the JSON lines here")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from lorakit.adapters.io import load_adapter
    from lorakit.toyworld.oracle import score
    from lorakit.models import load_base
    from lorakit.toyworld.concepts import get_concept
    from lorakit.toyworld.evaluate import generate
    from lorakit.toyworld.loras import train_concept_lora

    lines = []

    def emit(obj):
        print(json.dumps(obj), flush=True)
        lines.append(obj)

    base = load_base(args.base)
    base.set_progress_bar_config(disable=True)
    for pair in args.pairs:
        names = [get_concept(c).name for c in pair.split("+")]
        paths = [train_concept_lora(c, args.lora_dir) for c in names]
        adapters = [load_adapter(p) for p in paths]
        prompts = eval_prompts(*names, n=args.n)
        seconds: dict = {}
        present = {}
        for method in args.methods:
            pipe = fused_pipe(method, base, adapters, names, seconds)
            pipe.set_progress_bar_config(disable=True)
            t0 = time.perf_counter()
            images = generate(pipe, prompts, seed=5000)
            s = score(images, names)
            present[method] = s.present.clone()
            n = len(images)
            row = {"pair": pair, "method": method, "n": n, "fuse_s": seconds[method],
                   "s_per_image": round((time.perf_counter() - t0) / n, 3)}
            for j, c in enumerate(names + ["both"]):
                k = int(s.present[:, j].sum()) if c != "both" else int(s.present.all(1).sum())
                lo, hi = wilson(k, n)
                row[c] = {"k": k, "rate": round(k / n, 4), "ci95": [round(lo, 3), round(hi, 3)]}
            emit(row)
            del pipe
        first = args.methods[0]
        for other in args.methods[1:]:
            a, b = present[first].all(1), present[other].all(1)
            wins, losses = int((a & ~b).sum()), int((~a & b).sum())
            emit({"pair": pair, "compare": f"{first} vs {other}", "on": "both", "n": int(a.numel()),
                  "wins": wins, "losses": losses, "mcnemar_p": float(f"{mcnemar_exact(wins, losses):.3g}")})
            for j, c in enumerate(names):
                a1, b1 = present[first][:, j], present[other][:, j]
                w1, l1 = int((a1 & ~b1).sum()), int((~a1 & b1).sum())
                emit({"pair": pair, "compare": f"{first} vs {other}", "on": c, "n": int(a1.numel()),
                      "wins": w1, "losses": l1, "mcnemar_p": float(f"{mcnemar_exact(w1, l1):.3g}")})
    if args.out:
        from lorakit.fileio import write_text

        write_text("".join(json.dumps(x) + "\n" for x in lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
