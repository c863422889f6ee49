#!/usr/bin/env python
"""The GPU check's measurements (tools/gpu_check.sh runs this after the ``cuda``-marked tests). JSON lines:

  * ``env``: torch / CUDA versions, GPUs, bf16 support, the bf16 dense peak used for MFU;
  * ``train``: SD 1.5-size (random weights, the released configs) bf16 training step at 512 px, batch 4, rank 4:
    lorakit's block-wise trainer vs the plain diffusers + peft loop of tools/bench_train.py, step time, it/s, peak
    allocated VRAM, and lorakit.memory's estimate; ``train_ratio`` with the ratios and the MFU of each (UNet
    forward + backward FLOPs counted by ``torch.utils.flop_counter`` on the meta device / step time / bf16 peak);
  * ``train_edlora``: the ED-LoRA trainer vs the plain recipe of tools/bench_train.py (peft LoRA on both models'
    attention + textual inversion), once as is and once encoding the captions per cross-attention layer as ED-LoRA
    does, same size, batch and dtype: step time, peak VRAM, ratios;
  * ``sample``: composite vs cmlora (default split, the official one, one layer deeper) with N = 4 random LoRAs at
    512 px, 20 steps, bf16: seconds per image and marginal seconds per step, ratios to composite;
  * ``multi_gpu``: one line saying it was skipped when fewer than 2 GPUs are visible (the 2-GPU DDP equality is a
    ``cuda`` test and runs there when 2 GPUs exist).

``--dry-run`` runs every step on the CPU with the tiny pipeline at 32 px and 1-2 steps (to test this script).

    python tools/gpu_check.py                 # on a GPU machine (~2-4 min on an H100/H200)
    python tools/gpu_check.py --dry-run       # anywhere
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

# Dense bf16 tensor-core peak, FLOP/s (vendor datasheets, no sparsity), by a substring of the device name.
BF16_PEAK = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
             ("A10G", 70e12), ("L4", 121e12), ("4090", 165e12)]


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def bf16_peak(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK if k in name), None)


def env_row(device: str) -> dict:
    row = {"check": "env", "torch": torch.__version__, "cuda": torch.version.cuda, "device": device,
           "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    for pkg in ("diffusers", "peft", "transformers", "accelerate", "bitsandbytes"):
        try:
            row[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            row[pkg] = None
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        row.update(name=name, bf16=torch.cuda.is_bf16_supported(), bf16_peak_tflops=(bf16_peak(name) or 0) / 1e12 or None,
                   vram_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    return row


def unet_train_flops(size: str, batch: int, resolution: int, rank: int) -> float:
    """FLOPs of one UNet forward + backward with LoRA (flop_counter formulas; meta device, no memory)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lorakit.memory import _add_lora, _unet_inputs, meta_models

    arch_size = {"tiny": "tiny:sd1", "sd15": "random:sd1:full"}[size]
    arch, models = meta_models(arch_size)
    unet, vae = models["unet"], models["vae"]
    _add_lora(unet, arch, rank, conv=False)
    latent = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    args, kwargs = _unet_inputs(unet, arch, batch, latent, torch.float32)
    args[0].requires_grad_(False)
    with FlopCounterMode(display=False) as counter:
        unet(*args, **kwargs).sample.float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def check_train(a, device: str) -> None:
    import bench_train

    from lorakit.memory import estimate

    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    ns = argparse.Namespace(device=device, dtype=a.dtype, rank=4, batch=a.batch, warmup=a.warmup, steps=a.steps,
                            resolution=a.resolution, compile=False, size=a.size)
    est = estimate("train", {"tiny": "tiny:sd1", "sd15": "random:sd1:full"}[a.size], resolution=a.resolution,
                   batch=a.batch, dtype=dtype, device=device)
    flops = unet_train_flops(a.size, a.batch, a.resolution, 4)
    peak = bf16_peak(torch.cuda.get_device_name(0)) if device == "cuda" else None
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "img"
        folder.mkdir()
        captions = bench_train.make_images(folder, 2 * a.batch, a.resolution)
        for run in ("reference", "lorakit"):
            pipe = bench_train.make_pipe(a.size, dtype, device)
            t0 = time.perf_counter()
            res = (bench_train.reference(ns, pipe, folder, captions) if run == "reference"
                   else bench_train.lorakit_run(ns, pipe, folder, Path(tmp) / "out"))
            row = {"check": "train", "run": run, "size": a.size, "resolution": a.resolution, "batch": a.batch,
                   "dtype": a.dtype, "step_s": round(res["step_s"], 4), "it_s": round(1 / res["step_s"], 3),
                   "peak_mem_mb": round(res["peak_mem_mb"], 1), "total_s": round(time.perf_counter() - t0, 1),
                   "estimate_mb": round(est.total / 2**20, 1) if est else None,
                   "unet_train_tflop_per_step": round(flops / 1e12, 3)}
            if peak:
                row["mfu"] = round(flops / res["step_s"] / peak, 4)
            rows[run] = row
            emit(row)
            del pipe
            if device == "cuda":
                torch.cuda.empty_cache()
    ref, lk = rows["reference"], rows["lorakit"]
    emit({"check": "train_ratio", "speed_ratio": round(ref["step_s"] / lk["step_s"], 3),
          "mem_ratio": round(ref["peak_mem_mb"] / max(lk["peak_mem_mb"], 1e-9), 3),
          "goal": "speed_ratio >= 1 and mem_ratio >= 1 (lorakit at least as fast, no more memory)"})


def check_edlora(a, device: str) -> None:
    """ED-LoRA's trainer vs the plain recipe of tools/bench_train.py (peft LoRA on both models' attention + textual
    inversion of the two tokens) and vs that recipe encoding the captions once per cross-attention layer as
    ED-LoRA must (``reference_layers``), same images, rank, steps and dtype: step time and peak memory."""
    import bench_scale
    import bench_train

    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    ns = argparse.Namespace(device=device, dtype=a.dtype, rank=4, batch=a.batch, warmup=a.warmup, steps=a.steps,
                            resolution=a.resolution, compile=False, size=a.size)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "img"
        folder.mkdir()
        bench_train.make_images(folder, 2 * a.batch, a.resolution)
        for run in ("reference", "reference_layers", "lorakit"):
            pipe = bench_train.make_pipe(a.size, dtype, device)
            if run.startswith("reference"):
                res = bench_train.reference_edlora(ns, pipe, folder, layer_copies=run.endswith("layers"))
            else:
                with bench_train.PeakMemory(device) as mem:
                    res = bench_scale._train_edlora(ns, pipe, folder, Path(tmp) / "out")
                res["peak_mem_mb"] = mem.peak_mb
            rows[run] = {"check": "train_edlora", "run": run, "size": a.size, "resolution": a.resolution,
                         "batch": a.batch, "dtype": a.dtype, "step_s": round(res["step_s"], 4),
                         "peak_mem_mb": round(res["peak_mem_mb"], 1)}
            emit(rows[run])
            del pipe
            if device == "cuda":
                torch.cuda.empty_cache()
    lk = rows["lorakit"]
    for ref in ("reference", "reference_layers"):
        emit({"check": "train_edlora_ratio", "against": ref, "speed_ratio": round(rows[ref]["step_s"] / lk["step_s"], 3),
              "mem_ratio": round(rows[ref]["peak_mem_mb"] / max(lk["peak_mem_mb"], 1e-9), 3)})


SAMPLE_RUNS = (("composite", ()), ("cmlora", ()), ("cmlora", ("--cache-layer", "0")), ("cmlora", ("--cache-layer", "2")))


def check_sample(a, device: str) -> None:
    """Composite and CMLoRA (default split, the official split K = 0, one layer deeper K = 2): one image at S steps
    (after a warm-up image) and one at 2S; ``s_per_image`` is the S-step image, ``step_s`` the marginal
    (t(2S) - t(S)) / S without the fixed costs (adapter loading, text encoding, VAE decoding, writing)."""
    import bench_scale

    from lorakit.models import sized_pipeline

    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        pipe = sized_pipeline("sd1", "full" if a.size == "sd15" else "tiny", dtype=dtype, device=device)
        files = bench_scale._adapters(pipe, Path(tmp), a.n_loras, rank=bench_scale.RANK)
        kinds = ["character", "clothing", "style", "background", "object"][: a.n_loras]
        for method, extra in SAMPLE_RUNS if a.size == "sd15" else SAMPLE_RUNS[:3]:  # the tiny UNet has K = 0..1
            name = " ".join((method, *extra))

            def once(steps: int) -> float:
                argv = ["sample", "--base", "bench", "--adapters", *files, "--method", method, "--kinds", *kinds,
                        "--prompt", "a photo of a cat", "--steps", str(steps), "--size", str(a.resolution),
                        "--dtype", a.dtype, "--out", str(Path(tmp) / method), "--no-memory-check", *extra]
                with contextlib.redirect_stdout(sys.stderr):  # stdout: JSON lines only
                    secs = bench_scale._patched_cli(pipe, argv)
                    pipe.unload_lora_weights()
                return secs

            once(a.sample_steps)  # warm-up (kernels, allocator)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            short, long = once(a.sample_steps), once(2 * a.sample_steps)
            results[name] = (short, (long - short) / a.sample_steps)
            row = {"check": "sample", "method": name, "n_loras": a.n_loras, "resolution": a.resolution,
                   "steps": a.sample_steps, "dtype": a.dtype, "s_per_image": round(short, 3),
                   "step_s": round(results[name][1], 4)}
            if device == "cuda":
                row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            emit(row)
    comp = results["composite"]
    emit({"check": "sample_ratio", "goal": "cmlora <= 0.5x composite at N = 4",
          **{f"{name} / composite": {"per_image": round(r[0] / comp[0], 3), "per_step": round(r[1] / comp[1], 3)}
             for name, r in results.items() if name != "composite"}})


CHECKS = {"train": check_train, "train_edlora": check_edlora, "sample": check_sample}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny pipeline, 32 px, 1-2 steps: tests the script")
    p.add_argument("--steps", type=int, help="timed training steps (default 10 on the GPU)")
    p.add_argument("--only", nargs="+", choices=list(CHECKS), help="run only these checks (default: all)")
    a = p.parse_args(argv)
    if a.dry_run:
        device, a.size, a.resolution, a.batch, a.steps, a.warmup, a.sample_steps, a.n_loras, a.dtype = (
            "cpu", "tiny", 32, 1, 1, 1, 2, 2, "fp32")
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            emit({"check": "env", "error": "no CUDA GPU visible; use --dry-run on the CPU"})
            return 2
        device, a.size, a.resolution, a.batch, a.steps, a.warmup, a.sample_steps, a.n_loras, a.dtype = (
            "cuda", "sd15", 512, 4, a.steps or 10, 3, 20, 4, "bf16")
    emit(env_row(device))
    failures = 0
    for name, fn in CHECKS.items():
        if a.only and name not in a.only:
            continue
        t0 = time.perf_counter()
        try:
            fn(a, device)
        except Exception as err:  # noqa: BLE001 - one check failing must not hide the others' numbers
            failures += 1
            emit({"check": name, "error": f"{type(err).__name__}: {err}"[:500]})
        emit({"check": f"{name}_done", "seconds": round(time.perf_counter() - t0, 1)})
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if gpus < 2:
        emit({"check": "multi_gpu", "skipped": f"{gpus} GPU(s) visible; the 2-GPU DDP test needs 2"})
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
