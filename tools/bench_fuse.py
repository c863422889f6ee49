"""Closed-form gradient fusion vs the reference's LBFGS, on the same captured activations.

One gradient-fusion run with ``keep_inputs`` records every fused layer's raw inputs per concept; then, per layer:
  * closed form: accumulate ``G`` and ``P_i`` from those inputs (what lorakit's hooks do) + the Cholesky solve;
  * reference: LBFGS from W0 on the stored X / Y (500 iterations for text-encoder and to_k/to_v layers, 50 for
    the other UNet layers, as the reference), float32.
Both are scored with the same objective ``mean((X W^T - Y)^2)`` in float64. Prints JSON lines: one per layer,
one per stage and one overall with the wall-time ratio (LBFGS / closed form) and objective ratio.

    python tools/bench_fuse.py                       # tiny SD1 pipeline, 2 random concepts, CPU
    python tools/bench_fuse.py --layers 0 --steps 4  # every layer
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbfgs_fusion_reference import REFERENCE_ITERS, layer_data, lbfgs_solve, mse_objective  # noqa: E402

from lorakit.adapters.io import load_adapter, live_path  # noqa: E402
from lorakit.fusion import concept_prompts  # noqa: E402
from lorakit.fusion.gradient import Concept, GradientSettings, fuse_gradient, solve_layer, stage_of  # noqa: E402


def closed_form(stats, prob, n_concepts: int, ridge: float, W0: torch.Tensor, device) -> tuple[torch.Tensor, float]:
    """G/P accumulation from the stored inputs + the solve; returns (W* float32 [out, in_flat], seconds)."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    dim = prob.in_dim
    sync()
    t0 = time.perf_counter()
    G = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    P = {c: torch.zeros(d.shape[0], dim, dtype=torch.float64, device=device) for c, d in prob.downs.items()}
    for c, chunks in stats.inputs.items():
        down = prob.downs.get(c)
        down = down.to(device) if down is not None else None
        for x in chunks:
            x = x.to(device)
            G.addmm_(x.T, x)
            if down is not None:
                P[c].addmm_(down @ x.T, x)
    sol = solve_layer(G, P, prob, n_concepts, ridge)
    W = (W0.reshape(W0.shape[0], -1).double().to(device) + sol.up.to(device) @ sol.down).float()
    sync()
    return W.cpu(), time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="tiny:sd1")
    ap.add_argument("--adapters", nargs="*", help="adapter files (default: 2 random concepts on the tiny base)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--layers", type=int, default=6, help="layers per stage to bench (0 = all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lorakit.models import load_base
    from lorakit.testing import random_adapter

    pipe = load_base(args.base).to(args.device)
    base = copy.deepcopy(pipe)
    if args.adapters:
        adapters = [load_adapter(p) for p in args.adapters]
        names = [Path(p).stem for p in args.adapters]
    else:
        adapters, names = [], []
        for seed, trig in ((1, "red circle"), (2, "blue square")):
            ad = random_adapter(pipe, network="lora", text_encoder=True, rank=4, alpha=4.0, seed=seed, std=0.1)
            ad.metadata["lorakit.trigger"] = trig
            adapters.append(ad)
            names.append(trig.replace(" ", "_"))
    concepts = []
    for ad, name in zip(adapters, names):
        prompts, samples, _ = concept_prompts(ad, name, None)
        concepts.append(Concept(name, ad, 1.0, prompts, samples))
    settings = GradientSettings(steps=args.steps, resolution=args.resolution, samples=args.samples, progress=False,
                                keep_inputs=True)
    t0 = time.perf_counter()
    out = fuse_gradient(pipe, concepts, settings)
    t_fuse = time.perf_counter() - t0
    per_stage: dict[str, dict] = {}
    for key, prob in out["problems"].items():
        stage = stage_of(key)
        agg = per_stage.setdefault(stage, {"stage": stage, "layers": 0, "t_closed": 0.0, "t_lbfgs": 0.0,
                                           "obj_closed": 0.0, "obj_lbfgs": 0.0, "closed_le_lbfgs": 0})
        if args.layers and agg["layers"] >= args.layers:
            continue
        coll = out["stages"][stage]["collectors"].get(prob.component)
        if coll is None or key not in coll.stats:
            continue  # fallback layer: nothing to compare
        model = getattr(base, prob.component)
        W0 = model.get_submodule(live_path(model, prob.path)).weight.detach().cpu()
        X, Y = layer_data(coll.stats[key], prob, W0)
        W_closed, t_closed = closed_form(coll.stats[key], prob, len(concepts), settings.ridge, W0, args.device)
        iters = REFERENCE_ITERS[stage]
        dev = args.device
        sync = torch.cuda.synchronize if str(dev).startswith("cuda") else (lambda: None)
        sync()
        t1 = time.perf_counter()
        W_lbfgs = lbfgs_solve(X.to(dev), Y.to(dev), W0.reshape(W0.shape[0], -1).to(dev), iters).cpu()
        sync()
        t_lbfgs = time.perf_counter() - t1
        o_closed, o_lbfgs = mse_objective(W_closed, X, Y), mse_objective(W_lbfgs, X, Y)
        print(json.dumps({"layer": key, "stage": stage, "tokens": X.shape[0], "in": X.shape[1], "out": Y.shape[1],
                          "lbfgs_iters": iters, "t_closed_s": round(t_closed, 5), "t_lbfgs_s": round(t_lbfgs, 4),
                          "speedup": round(t_lbfgs / t_closed, 1), "obj_closed": o_closed, "obj_lbfgs": o_lbfgs}))
        agg["layers"] += 1
        agg["t_closed"] += t_closed
        agg["t_lbfgs"] += t_lbfgs
        agg["obj_closed"] += o_closed
        agg["obj_lbfgs"] += o_lbfgs
        agg["closed_le_lbfgs"] += int(o_closed <= o_lbfgs)
    tot = {"stage": "all", "layers": 0, "t_closed": 0.0, "t_lbfgs": 0.0, "obj_closed": 0.0, "obj_lbfgs": 0.0,
           "closed_le_lbfgs": 0}
    for agg in per_stage.values():
        for k in ("layers", "t_closed", "t_lbfgs", "obj_closed", "obj_lbfgs", "closed_le_lbfgs"):
            tot[k] += agg[k]
    for agg in [*per_stage.values(), tot]:
        agg["speedup"] = round(agg["t_lbfgs"] / max(agg["t_closed"], 1e-12), 1)
        agg["objective_ratio_closed_over_lbfgs"] = agg["obj_closed"] / max(agg["obj_lbfgs"], 1e-300)
        agg["device"] = str(args.device)
        agg["threads"] = torch.get_num_threads()
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) and k.startswith("t_") else v) for k, v in agg.items()}))
    print(json.dumps({"fuse_gradient_total_s": round(t_fuse, 2), "layers_fused": len(out["problems"]),
                      "base": args.base, "steps": args.steps, "resolution": args.resolution}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
