#!/usr/bin/env python
"""Per-pair merge time of LoRA.rar (one hypernetwork forward) vs ZipLoRA (per-pair optimisation), and the loss each
reaches, in the same run. JSON lines: one per held-out pair, then a summary with the median speed-up.

    python tools/bench_merge.py                                  # tiny SD1 base, trains a toy hypernetwork first
    python tools/bench_merge.py --hypernet H.safetensors --pairs 5 --ziplora-steps 100 --device cuda

Pairs are random content (all blocks) / style (upper blocks) LoRAs the hypernetwork never saw (the trainer's
``synthetic.eval_pairs``). Both methods get the same precomputed references (reference preparation is excluded
from both timings). Losses are the ZipLoRA objective over every layer both LoRAs touch, on the same fixed noise:
``sum`` (all coefficients 1), ``lorarar`` (hypernetwork coefficients on its layers, 1 elsewhere), ``ziplora``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "train_configs/toy_lorarar.yaml"))
    p.add_argument("--hypernet", help="a trained hypernetwork (default: train one with --train-steps on the config)")
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--pairs", type=int, default=3, help="held-out pairs to merge")
    p.add_argument("--ziplora-steps", type=int, default=100)
    p.add_argument("--ziplora-lr", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=5, help="LoRA.rar merges per pair (the median is reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="/tmp/bench_merge", help="work folder (hypernetwork training output)")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value), e.g. synthetic.rank=8")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)

    import warnings

    from lorakit.config import load_config
    from lorakit.fusion.ziplora import noise_scheduler_of
    from lorakit.training.lorarar import LoraRarConfig, synthetic_entries

    warnings.filterwarnings("ignore")
    cfg = load_config(LoraRarConfig, args.config, [
        f"output_dir={args.out}", f"max_steps={args.train_steps}", f"synthetic.eval_pairs={args.pairs}",
        "checkpointing_steps=0", "checkpoint_at_end=false", "logging=none", "overwrite=true", *args.overrides,
    ])
    device = torch.device(args.device)
    pipe, net = _base_and_hypernet(args, cfg)
    pipe.to(device)
    net.to(device).eval()
    _, _, pairs = synthetic_entries(cfg, pipe)
    scheduler = noise_scheduler_of(pipe)
    rows = []
    for c, s in pairs:
        rows.append(_bench_pair(args, cfg, pipe, net, scheduler, device, c, s))
        print(json.dumps(rows[-1]), flush=True)
    ratios = [r["speedup"] for r in rows]
    print(json.dumps({
        "summary": True, "pairs": len(rows), "median_speedup": statistics.median(ratios), "goal": 1000,
        "meets_goal": statistics.median(ratios) >= 1000,
        "mean_loss_sum": statistics.mean(r["loss_sum"] for r in rows),
        "mean_loss_lorarar": statistics.mean(r["loss_lorarar"] for r in rows),
        "mean_loss_ziplora": statistics.mean(r["loss_ziplora"] for r in rows),
    }), flush=True)
    return 0


def _base_and_hypernet(args, cfg):
    """The frozen base, and the hypernetwork: ``--hypernet``, or one trained here for ``--train-steps``."""
    from lorakit.fusion.lorarar import load_hypernet
    from lorakit.models import load_base
    from lorakit.training.lorarar import train

    pipe = load_base(cfg.base_model)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if m is not None:
            m.requires_grad_(False)
    if args.hypernet:
        return pipe, load_hypernet(args.hypernet)
    t0 = time.perf_counter()
    net = train(cfg, pipe=pipe).hypernet.cpu()
    print(json.dumps({"event": "trained_hypernet", "steps": args.train_steps, "seconds": round(time.perf_counter() - t0, 2),
                      "pairs": cfg.synthetic.content * cfg.synthetic.style}), flush=True)
    return pipe, net


def _bench_pair(args, cfg, pipe, net, scheduler, device, c, s) -> dict:
    """One held-out pair: both merges timed, and the loss each reaches (one JSON row)."""
    from lorakit.fusion.lorarar import merge_pair
    from lorakit.fusion.ziplora import (
        ALL_LAYERS, ZipLoRALoss, eval_batches, evaluate, ones_coefficients, plan_merge, ziplora_merge,
    )

    # LoRA.rar: one forward pass + exact export (median of --repeats)
    times = []
    for _ in range(args.repeats):
        _sync(device)
        t0 = time.perf_counter()
        merge_pair(net, c.adapter, s.adapter)
        _sync(device)
        times.append(time.perf_counter() - t0)
    t_rar = statistics.median(times)
    with torch.no_grad():
        rar_plan = plan_merge(c.adapter, s.adapter, net.merge_layers)
        rar_coeffs = net.coefficients(rar_plan)
    # ZipLoRA: --ziplora-steps of per-pair optimisation + export
    _sync(device)
    t0 = time.perf_counter()
    _, info = ziplora_merge(pipe, c.adapter, s.adapter, steps=args.ziplora_steps, lr=args.ziplora_lr, lam=cfg.lam,
                            layers=ALL_LAYERS, refs=(c.ref, s.ref), progress=False, batch_size=cfg.ref_batch_size)
    _sync(device)
    t_zip = time.perf_counter() - t0
    # the same objective (every shared layer) and noise for all three merges
    lf = ZipLoRALoss(pipe.unet, scheduler, plan_merge(c.adapter, s.adapter, ALL_LAYERS), c.ref, s.ref, lam=cfg.lam)
    batches = eval_batches(lf, n=cfg.eval_batches, batch_size=2, seed=99)
    ones = ones_coefficients(lf.plan, lf.device)
    return {
        "pair": f"{c.name}+{s.name}", "device": str(device), "base": cfg.base_model,
        "lorarar_s": t_rar, "ziplora_s": t_zip, "ziplora_steps": args.ziplora_steps,
        "speedup": t_zip / t_rar,
        "loss_sum": evaluate(lf, ones, batches),
        "loss_lorarar": evaluate(lf, {**ones, **rar_coeffs}, batches),
        "loss_ziplora": evaluate(lf, info["coefficients"], batches),
        "lorarar_layers": len(rar_plan.merged), "ziplora_layers": len(lf.plan.merged),
    }


if __name__ == "__main__":
    sys.exit(main())
