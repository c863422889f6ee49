#!/usr/bin/env python
"""Benchmark: every stage at tiny / mid / SD 1.5 (/ SDXL) size on the CPU, time and peak RSS, lorakit vs reference.

Each (size, stage) runs in its own process, so its peak RSS (``ru_maxrss``) is that stage's alone. The process
builds the random-weight pipeline (:func:`lorakit.models.sized_pipeline`, built directly in the run's dtype) and
then times the stage only:

  * ``train_ref``:  plain diffusers + peft LoRA step (VAE encode, text encode, UNet forward/backward, AdamW) as in
                    tools/bench_train.py;
  * ``train``:      lorakit's block-wise trainer (latent cache, shared loop) on the same images, rank, dtype;
  * ``sample_ref``: a diffusers pipeline call with two peft LoRAs active (``unet.set_adapters``), CFG 7.5;
  * ``sample``:     ``lorakit sample --method merge`` with two random LoRAs of the same rank;
  * ``composite``:  ``lorakit sample --method composite`` (one UNet pass per LoRA per step);
  * ``fuse``:       ``lorakit fuse --method gradient`` of two LoRAs end to end (capture + solve), with the number of
                    layers that fell back to the weighted average.

Sampling rows run one image at S (warm-up, not counted), S and 2S steps: ``total_s`` is the 2S run, ``step_s`` the marginal
``(t(2S) - t(S)) / S`` (the fixed cost of loading adapters, encoding, decoding and writing files left out).

Sizes: tiny and mid (``sized_pipeline``'s; 2x VAE) at 32 px, sd15 / sdxl (the released models' configs) at 128 px:
latents are 16x16 everywhere, so the cost grows with the model only. Each row also has ``lorakit.memory``'s
estimate for that stage, to compare with the measured peak.

Writes JSON lines (one per run, then ``ratio`` rows lorakit / reference and ``growth`` rows size / tiny) to stdout
and ``--out``:

    flock /work/heavy.lock python tools/bench_scale.py --sizes tiny mid sd15 --out runs/scale.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # name: (arch, sized_pipeline size, pixels, default dtype)
    "tiny": ("sd1", "tiny", 32, "fp32"),
    "mid": ("sd1", "mid", 32, "fp32"),
    "sd15": ("sd1", "full", 128, "bf16"),
    "sdxl": ("sdxl", "full", 128, "bf16"),
}
STAGES = ("train_ref", "train", "sample_ref", "sample", "composite", "fuse")
RANK = 4


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _train(args, pipe, work: Path, reference: bool) -> dict:
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_train

    folder = work / "img"
    folder.mkdir()
    captions = bench_train.make_images(folder, 2 * args.batch, args.resolution)
    ns = argparse.Namespace(device="cpu", dtype=args.dtype, rank=RANK, batch=args.batch, warmup=args.warmup,
                            steps=args.steps, resolution=args.resolution, compile=False)
    t0 = time.perf_counter()
    res = (bench_train.reference(ns, pipe, folder, captions) if reference
           else bench_train.lorakit_run(ns, pipe, folder, work / "out"))
    return {"step_s": res["step_s"], "total_s": time.perf_counter() - t0}


def _adapters(pipe, work: Path, n: int) -> list[str]:
    from lorakit.adapters.io import save_adapter
    from lorakit.testing import random_adapter

    files = []
    for i in range(n):
        files.append(str(work / f"lora{i}.safetensors"))
        save_adapter(random_adapter(pipe, rank=RANK, alpha=RANK, seed=i, std=0.01), files[-1])
    return files


def _patched_cli(pipe, argv: list[str]) -> float:
    """Run ``lorakit`` in this process with the base already built (load_base returns it); seconds."""
    import lorakit.models
    from lorakit.cli import main

    lorakit.models.load_base = lambda *a, **k: pipe
    t0 = time.perf_counter()
    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"lorakit {' '.join(argv[:3])} failed with {rc}")
    return time.perf_counter() - t0


def _sample(args, pipe, work: Path, method: str) -> dict:
    """One image at S and at 2S steps: total seconds of the 2S run, and the marginal seconds per step
    ``(t(2S) - t(S)) / S`` (without the fixed cost: adapter loading, prompt encoding, VAE decode, PNG + sidecar)."""
    files = _adapters(pipe, work, args.n_loras)
    times = []
    for steps in (args.sample_steps, args.sample_steps, 2 * args.sample_steps):  # the first warms up (lazy imports)
        times.append(_patched_cli(pipe, ["sample", "--base", "bench", "--adapters", *files, "--method", method,
                                         "--prompt", "a photo of a cat", "--steps", str(steps), "--size",
                                         str(args.resolution), "--dtype", args.dtype, "--out", str(work / f"s{steps}"),
                                         "--no-memory-check"]))
        pipe.unload_lora_weights()
    return {"total_s": times[2], "step_s": (times[2] - times[1]) / args.sample_steps, "steps": 2 * args.sample_steps,
            "n_loras": args.n_loras}


def _sample_ref(args, pipe, work: Path) -> dict:
    import torch
    from peft import LoraConfig

    from lorakit.blocks import lora_able_modules, module_ranks, resolve_block_spec
    from lorakit.models import pipeline_arch

    # The modules random_adapter (lorakit's runs) adapts: "all" blocks, LoRA.
    targets = list(module_ranks(lora_able_modules(pipe.unet), resolve_block_spec("all", pipeline_arch(pipe), RANK),
                                "lora", RANK, RANK))
    names = []
    for i in range(args.n_loras):
        torch.manual_seed(i)
        pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets, init_lora_weights=False),
                              adapter_name=f"a{i}")
        names.append(f"a{i}")
    pipe.unet.set_adapters(names, [1.0] * len(names))
    pipe.to(dtype=_torch_dtype(args.dtype))
    times = []
    for steps in (args.sample_steps, args.sample_steps, 2 * args.sample_steps):  # as _sample: warm-up, S, 2S
        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe("a photo of a cat", num_inference_steps=steps, height=args.resolution, width=args.resolution,
                 guidance_scale=7.5, generator=gen, output_type="np")
        times.append(time.perf_counter() - t0)
    return {"total_s": times[2], "step_s": (times[2] - times[1]) / args.sample_steps, "steps": 2 * args.sample_steps,
            "n_loras": args.n_loras}


def _fuse(args, pipe, work: Path) -> dict:
    files = _adapters(pipe, work, args.n_loras)
    out = work / "fused.safetensors"
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[args.dtype]
    total = _patched_cli(pipe, ["fuse", "--method", "gradient", "--base", "bench", "--adapters", *files, "--out",
                                str(out), "--out-format", "adapter", "--steps", str(args.sample_steps), "--resolution",
                                str(args.resolution), "--dtype", dtype, "--quiet", "--no-memory-check"])
    report = json.loads(out.with_name(out.stem + ".fusion.json").read_text())
    summary = report.get("summary", {})
    return {"total_s": total, "n_loras": args.n_loras, "layers": summary.get("layers"),
            "fallback_layers": len(summary.get("fallback_layers") or [])}


def _estimate_mb(args, stage: str) -> float | None:
    from lorakit.memory import estimate

    arch, size, _, _ = SIZES[args.size]
    base = f"random:{arch}:{size}"
    kind = {"train_ref": "train", "train": "train", "fuse": "fuse-gradient"}.get(stage, "sample")
    est = estimate(kind, base, resolution=args.resolution, batch=args.batch if kind == "train" else 1, rank=RANK,
                   n_loras=args.n_loras, dtype=_torch_dtype(args.dtype), method=stage if stage == "composite" else "merge",
                   cfg=kind != "fuse-gradient")
    return round(est.total / 2**20, 1) if est else None


def run_one(args) -> dict:
    """One (size, stage) in this process; returns its JSON row."""
    import torch

    from lorakit.models import sized_pipeline

    torch.set_num_threads(args.threads)
    arch, size, _, _ = SIZES[args.size]
    t0 = time.perf_counter()
    pipe = sized_pipeline(arch, size, seed=0, dtype=_torch_dtype(args.dtype))
    build_s, rss_built = time.perf_counter() - t0, _rss_mb()
    params = sum(p.numel() for p in pipe.unet.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.one in ("train_ref", "train"):
            res = _train(args, pipe, work, reference=args.one == "train_ref")
        elif args.one == "sample_ref":
            res = _sample_ref(args, pipe, work)
        elif args.one in ("sample", "composite"):
            res = _sample(args, pipe, work, "merge" if args.one == "sample" else "composite")
        else:
            res = _fuse(args, pipe, work)
    peak = _rss_mb()
    del pipe
    row = {"run": args.one, "size": args.size, "arch": arch, "resolution": args.resolution, "dtype": args.dtype,
           "batch": args.batch, "rank": RANK, "unet_params_m": round(params / 1e6, 1), "threads": args.threads,
           "build_s": round(build_s, 2), **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()},
           "rss_after_build_mb": round(rss_built, 1), "peak_rss_mb": round(peak, 1)}
    row["estimate_mb"] = _estimate_mb(args, args.one)
    return row


def derived_rows(rows: list[dict]) -> list[dict]:
    """``ratio`` rows (lorakit / reference at each size) and ``growth`` rows (each size / tiny, per stage)."""
    out = []
    by = {(r["size"], r["run"]): r for r in rows if "error" not in r}
    for size in {r["size"] for r in rows}:
        for lk, ref, key in (("train", "train_ref", "step_s"), ("sample", "sample_ref", "step_s")):
            a, b = by.get((size, lk)), by.get((size, ref))
            if a and b:
                out.append({"run": "ratio", "size": size, "stage": lk, "time_ratio": round(a[key] / b[key], 3),
                            "peak_rss_ratio": round(a["peak_rss_mb"] / b["peak_rss_mb"], 3)})
    for (size, stage), r in sorted(by.items()):
        base = by.get(("tiny", stage))
        if base and size != "tiny":
            key = "step_s" if "step_s" in r else "total_s"
            out.append({"run": "growth", "size": size, "stage": stage,
                        "params_x": round(r["unet_params_m"] / base["unet_params_m"], 1),
                        "time_x": round(r[key] / base[key], 1),
                        "peak_rss_x": round(r["peak_rss_mb"] / base["peak_rss_mb"], 2)})
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["tiny", "mid", "sd15"])
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: fp32 tiny/mid, bf16 sd15/sdxl")
    p.add_argument("--resolution", type=int, help="pixels (default: 32 tiny/mid, 128 sd15/sdxl: 16x16 latents)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="timed training steps (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--sample-steps", type=int, default=2, help="sampling steps per image (and gradient capture)")
    p.add_argument("--n-loras", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per (size, stage) process")
    p.add_argument("--out", help="append JSON lines here too (e.g. runs/scale.jsonl)")
    p.add_argument("--derive", metavar="JSONL", help="only print the ratio / growth rows of the runs in this file "
                                                      "(the last row of each size and stage)")
    p.add_argument("--one", choices=STAGES, help=argparse.SUPPRESS)  # internal: run one stage in this process
    p.add_argument("--size", choices=list(SIZES), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _emit(row: dict, out: Path | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(line + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        _, _, px, dt = SIZES[args.size]
        args.resolution, args.dtype = args.resolution or px, args.dtype or dt
        with open(os.devnull, "w") as devnull:  # stdout carries the one JSON row only
            real, sys.stdout = sys.stdout, devnull
            try:
                row = run_one(args)
            finally:
                sys.stdout = real
        print("ROW " + json.dumps(row), flush=True)
        return 0
    out = Path(args.out) if args.out else None
    if args.derive:
        runs = [json.loads(ln) for ln in Path(args.derive).read_text().splitlines() if ln.strip()]
        last = {(r["size"], r["run"]): r for r in runs if r.get("run") in STAGES}
        for row in derived_rows(list(last.values())):
            _emit(row, out)
        return 0
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "LORAKIT_NO_MEMORY_CHECK": "1"}
    rows = []
    for size in args.sizes:
        for stage in args.stages:
            cmd = [sys.executable, __file__, "--one", stage, "--size", size, "--batch", str(args.batch), "--steps",
                   str(args.steps), "--warmup", str(args.warmup), "--sample-steps", str(args.sample_steps),
                   "--n-loras", str(args.n_loras), "--threads", str(args.threads)]
            cmd += ["--dtype", args.dtype] if args.dtype else []
            cmd += ["--resolution", str(args.resolution)] if args.resolution else []
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
                row = json.loads(lines[-1][4:]) if lines else {
                    "run": stage, "size": size, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
            except subprocess.TimeoutExpired:
                row = {"run": stage, "size": size, "error": f"timeout after {args.timeout} s"}
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            _emit(row, out)
    for row in derived_rows(rows):
        _emit(row, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
