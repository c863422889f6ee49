"""Folded ED-LoRA concepts (``lorakit fuse --method gradient --fold-concepts``) on the toy world: how closely the
folded model, prompted with plain stand-in words, follows each concept.

Inputs: ED-LoRA files (``--edloras robot=PATH [frog=PATH ...]``, ``train_configs/toy_edlora_character.yaml``).
One gradient fusion of all of them (default settings; fit prompts: 4 toy captions per concept, rng seed 0,
trigger replaced by the pseudo-words; held-out for the ridges: 4 more, seed 1), then the fold on the same
prompts with ``--concept-word`` (default: each concept's name). Evaluation on ``--n`` other captions per
concept (seed 2), never fitted:

* ``kv``: mean squared difference of every cross-attention layer's keys / values (aligned token rows) from the
  concept's own ED-LoRA (``load_edlora`` on the base, pseudo-word prompt), relative to the base's (stand-in
  prompt): ``base`` = 1; ``unfolded`` = the gradient-fused model with the stand-in prompt; ``folded``; and
  ``lorakit`` = the fused model with the pseudo-words (lorakit's own pipeline). Per prompt, folded vs unfolded
  wins / losses with an exact sign (McNemar) test.
* ``collateral``: on ``--n`` generic prompts without any concept (seed 3), the keys / values of the base and
  of the folded model against the unfolded fused model's (absolute mean squared difference): what folding
  changes elsewhere, next to what fusing itself changes.
* ``--images``: oracle presence of the concept in one image per prompt (seeds 5000.., toy sampling defaults) for
  the same four, Wilson 95% intervals, folded vs each other paired (McNemar).

    python tools/measure_edlora_fold.py --edloras robot=/tmp/edfold/robot/edlora.safetensors --n 16 --images
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorakit.adapters.edlora import load_edlora  # noqa: E402
from lorakit.adapters.io import load_adapter  # noqa: E402
from lorakit.eval.stats import mcnemar_exact, wilson  # noqa: E402
from lorakit.fusion.edlora_fold import ConceptFold  # noqa: E402
from lorakit.fusion.edlora_fold_check import kv_gap  # noqa: E402
from lorakit.fusion.gradient import Concept, GradientSettings, fuse_gradient  # noqa: E402
from lorakit.models import load_base  # noqa: E402
from lorakit.toyworld.concepts import get_concept  # noqa: E402
from lorakit.toyworld.evaluate import concept_prompts, generic_prompts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edloras", nargs="+", required=True, metavar="CONCEPT=PATH")
    ap.add_argument("--concept-word", nargs="+", metavar="CONCEPT=TEXT", help="stand-ins (default: the names)")
    ap.add_argument("--n", type=int, default=16, help="held-out prompts per concept")
    ap.add_argument("--fit", type=int, default=4, help="fit prompts per concept (and as many held-out for ridges)")
    ap.add_argument("--steps", type=int, default=20, help="gradient fusion's UNet-stage sampling steps")
    ap.add_argument("--images", action="store_true", help="also score one image per prompt with the oracle")
    ap.add_argument("--no-preserve", action="store_true", help="ablation: fold without the rows that keep the "
                    "unfolded model's keys / values on the prompts with the concept words removed")
    ap.add_argument("--base", default=str(REPO / "data" / "toy-base"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="also write the JSON lines here")
    return ap.parse_args(argv)


def fuse_and_fold(args, base, files: dict, pseudo, emit):
    """Gradient fusion of every ED-LoRA, then the fold: (folded model, unfolded fused model, stand-in words)."""
    concepts = []
    for n, p in files.items():
        fit, val = pseudo(n, concept_prompts(n, args.fit, seed=0)), pseudo(n, concept_prompts(n, args.fit, seed=1))
        concepts.append(Concept(n, load_adapter(p), 1.0, fit, list(fit), val, list(val)))
    fused = copy.deepcopy(base)
    t0 = time.perf_counter()
    fold = ConceptFold.prepare(fused, concepts, args.concept_word)
    fold.preserve = not args.no_preserve
    out = fuse_gradient(fused, concepts, GradientSettings(steps=args.steps, progress=False))
    t1 = time.perf_counter()
    unfolded = copy.deepcopy(fused)
    out = fold.apply(fused, concepts, out)
    t2 = time.perf_counter()
    stand = {n: s["text"] for n, s in out["fold"]["stand_ins"].items()}
    emit({"measure": "edlora_fold_fit", "concepts": list(files), "stand_ins": stand, "preserve": fold.preserve,
          "fuse_s": round(t1 - t0, 1), "fold_s": round(t2 - t1, 1), "rows": out["fold"]["rows"],
          "mean_heldout_vs_unfolded": out["fold"]["mean_heldout_vs_unfolded"],
          "ridges": sorted({str(r["ridge"]) for r in out["fold"]["layers"].values()})})
    return fused, unfolded, stand


def concept_kv(args, emit, n: str, path, base, unfolded, fused, stand: dict, pseudo) -> None:
    """One concept's keys / values against its own ED-LoRA (and, with ``--images``, oracle presence)."""
    held = concept_prompts(n, args.n, seed=2)
    ref_prompts = pseudo(n, held)
    plain = [p.replace(get_concept(n).trigger, stand[n]) for p in held]
    ref = copy.deepcopy(base)
    load_edlora(ref, path)
    models = {"base": (base, plain), "unfolded": (unfolded, plain), "folded": (fused, plain),
              "lorakit": (unfolded, ref_prompts)}
    gaps = {m: [kv_gap(pipe, [pr[k]], ref, [ref_prompts[k]]) for k in range(len(held))]
            for m, (pipe, pr) in models.items()}
    rel = {m: [g / b for g, b in zip(v, gaps["base"])] for m, v in gaps.items()}
    wins = sum(f < u for f, u in zip(gaps["folded"], gaps["unfolded"]))
    emit({"measure": "edlora_fold_kv", "concept": n, "stand_in": stand[n], "n": len(held),
          "kv_vs_base": {m: round(sum(v) / len(v), 4) for m, v in rel.items()},
          "kv_vs_base_max": {m: round(max(v), 4) for m, v in rel.items()},
          "folded_vs_unfolded": {"wins": wins, "losses": len(held) - wins,
                                 "sign_test_p": float(f"{mcnemar_exact(wins, len(held) - wins):.3g}")},
          "example": {"plain": plain[0], "pseudo": ref_prompts[0]}})
    if args.images:
        images(emit, n, models, len(held))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    files = dict(kv.split("=", 1) for kv in args.edloras)
    base = load_base(args.base)
    base.set_progress_bar_config(disable=True)
    lines = []

    def emit(obj):
        print(json.dumps(obj), flush=True)
        lines.append(obj)

    words = {n: load_adapter(p).metadata["lorakit.trigger"].strip() for n, p in files.items()}

    def pseudo(n, prompts):
        return [p.replace(get_concept(n).trigger, words[n]) for p in prompts]

    fused, unfolded, stand = fuse_and_fold(args, base, files, pseudo, emit)
    other = [p for p, _ in generic_prompts(args.n, seed=3)]  # no concept: what the fold should leave alone
    emit({"measure": "edlora_fold_collateral", "n": len(other), "example": other[0],
          "kv_vs_unfolded": {m: round(kv_gap(pipe, other, unfolded, other), 6) for m, pipe in
                             (("base", base), ("folded", fused))}})
    for n, path in files.items():
        concept_kv(args, emit, n, path, base, unfolded, fused, stand, pseudo)
    if args.out:
        from lorakit.fileio import write_text

        write_text("".join(json.dumps(x) + "\n" for x in lines), args.out)
    return 0


def images(emit, name: str, models: dict, n: int) -> None:
    from lorakit.toyworld.oracle import score
    from lorakit.toyworld.evaluate import generate

    present = {}
    for m, (pipe, prompts) in models.items():
        present[m] = score(generate(pipe, prompts, seed=5000), [name]).present[:, 0].clone()
        k = int(present[m].sum())
        lo, hi = wilson(k, n)
        emit({"measure": "edlora_fold_presence", "concept": name, "model": m, "n": n, "k": k, "rate": round(k / n, 3),
              "ci95": [round(lo, 3), round(hi, 3)], "example": prompts[0]})
    for other in ("base", "unfolded", "lorakit"):
        a, b = present["folded"], present[other]
        wins, losses = int((a & ~b).sum()), int((~a & b).sum())
        emit({"measure": "edlora_fold_presence_pair", "concept": name, "compare": f"folded vs {other}", "n": n,
              "wins": wins, "losses": losses, "mcnemar_p": float(f"{mcnemar_exact(wins, losses):.3g}")})


if __name__ == "__main__":
    sys.exit(main())
