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

  * ``train_gc`` / ``train_locon`` / ``train_edlora``: the block-wise trainer with gradient checkpointing, LoCon,
                    and the ED-LoRA trainer;
  * ``switch`` / ``cmlora``: ``lorakit sample --method switch / cmlora`` (cmlora with ``--kinds``: no profiling);
  * ``ziplora`` / ``lorarar``: ``lorakit fuse`` of one pair (LoRA.rar with a random-weight hypernetwork).

Curves: ``--n-loras 2 4 8``, ``--resolutions 64 128 256``, ``--ranks 4 16 64`` give one point per value (``curve``
rows: each against its smallest), ``--repeat K`` K fresh processes per point (``spread`` rows), ``--shared`` runs
the points of the stages that leave the base unchanged in one process per size; ``--derive FILE --plot PNG``
draws the curves (matplotlib: ``pip install 'lorakit[bench]'``). Rows carry the kernel's peak RSS, the peak
private (anonymous) RSS and the machine's load average. Repeats run every stage once, then again, so the
lorakit and reference arms interleave (``paired_ratio`` rows: the k-th run of each, ratio per pair, mean, min,
max). ``--max-rss-mb`` stops a point's process whose RSS passes it (the row says so, with the highest RSS seen).
Gradient fusion rows count the layers per kind (linear, 1x1 conv, larger conv) solved on their full input, in
the LoRA subspace or by the weighted average; ``--fuse-ridge`` and ``--capture-batch`` are passed to it.
``--cmlora-flops STEPS`` only counts CMLoRA's UNet FLOPs against Composite's for one image (meta device).

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
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # name: (arch, sized_pipeline size, pixels, default dtype)
    "tiny": ("sd1", "tiny", 32, "fp32"),
    "mid": ("sd1", "mid", 32, "fp32"),
    "sd15": ("sd1", "full", 128, "bf16"),
    "sdxl": ("sdxl", "full", 128, "bf16"),
}
TRAIN = ("train_ref", "train", "train_gc", "train_locon", "train_edlora")
# The reference loop of each trainer variant (tools/bench_train.py): diffusers' gradient checkpointing, peft LoRA on
# the resnet convs too, peft LoRA + textual inversion of the same two tokens.
TRAIN_REFS = {"train_gc": "train_ref_gc", "train_locon": "train_ref_locon", "train_edlora": "train_ref_edlora"}
# ED-LoRA encodes one prompt copy per cross-attention layer; this reference does that text-encoder work too
# (bench_train.reference_edlora(layer_copies=True)), so its ratio measures the implementation, not the method.
EXTRA_REFS = {"train_edlora": "train_ref_edlora_layers"}
SAMPLE = ("sample_ref", "sample", "switch", "composite", "cmlora")
STAGES = (*TRAIN, *TRAIN_REFS.values(), *EXTRA_REFS.values(), *SAMPLE, "fuse", "ziplora", "lorarar")
# Stages that leave the built base as they found it (adapters loaded per call, then unloaded): with --shared
# they run one after another in one process per size, the peak RSS reset before each (/proc/self/clear_refs).
SHAREABLE = ("sample", "switch", "composite", "cmlora", "lorarar")
N_STAGES = (*SAMPLE, "fuse")  # stages whose cost depends on the number of LoRAs (--n-loras); the others use 2
RANK = 4
_SAMPLE_METHOD = {"sample": "merge", "switch": "switch", "composite": "composite", "cmlora": "cmlora"}


def _status_mb(key: str) -> float:
    """``VmHWM`` (peak RSS since start or the last reset) or ``VmRSS`` of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakAnon:
    """Peak private (anonymous) RSS during a block, polled every 5 ms from /proc/self/status. The kernel's peak
    (``VmHWM``) also counts file-backed pages: library code and mmap-read files, shared and droppable, which
    differ between code paths that run different library functions."""

    def __enter__(self):
        self.peak_mb, self._stop = _status_mb("RssAnon"), threading.Event()

        def poll():
            while not self._stop.wait(0.005):
                self.peak_mb = max(self.peak_mb, _status_mb("RssAnon"))

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _status_mb("RssAnon"))


def _reset_peak() -> float:
    """Free what Python and malloc hold, reset the kernel's peak-RSS counter to the current RSS; the RSS, MiB."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _train(args, pipe, work: Path, stage: str) -> dict:
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_train

    folder = work / "img"
    folder.mkdir()
    captions = bench_train.make_images(folder, 2 * args.batch, args.resolution)
    ns = argparse.Namespace(device="cpu", dtype=args.dtype, rank=args.rank, batch=args.batch, warmup=args.warmup,
                            steps=args.steps, resolution=args.resolution, compile=False)
    t0 = time.perf_counter()
    if stage == "train_ref":
        res = bench_train.reference(ns, pipe, folder, captions)
    elif stage in ("train_ref_gc", "train_ref_locon"):
        res = bench_train.reference(ns, pipe, folder, captions, network="locon" if stage.endswith("locon") else "lora",
                                    gradient_checkpointing=stage.endswith("gc"))
    elif stage in ("train_ref_edlora", "train_ref_edlora_layers"):
        res = bench_train.reference_edlora(ns, pipe, folder, layer_copies=stage.endswith("_layers"))
    elif stage == "train_edlora":
        res = _train_edlora(args, pipe, folder, work / "out")
    else:
        extra = {"train": (), "train_gc": ("gradient_checkpointing=true",),
                 "train_locon": ("network.type=locon", f"network.conv_rank={args.rank}",
                                 f"network.conv_alpha={args.rank}")}[stage]
        import lorakit.models

        # As `lorakit train` runs: the trainer loads (here: is handed) the base itself, so it owns it.
        lorakit.models.load_base = lambda *a, **k: pipe
        res = bench_train.lorakit_run(ns, None, folder, work / "out", extra)
    return {"step_s": res["step_s"], "step_times": res.get("step_times"), "total_s": time.perf_counter() - t0}


def _train_edlora(args, pipe, folder: Path, out: Path) -> dict:
    """ED-LoRA (two new tokens, LoRA on the text encoder and the UNet's attention), same images and steps."""
    import contextlib
    import statistics

    from lorakit.config import load_config
    from lorakit.training.edlora import EDLoRAConfig, train

    for cap in folder.glob("*.txt"):
        cap.write_text("a photo of <TOK>")
    cfg = load_config(EDLoRAConfig, None, [
        "base_model=bench", f"data.path={folder}", f"output_dir={out}", f"data.resolution={args.resolution}",
        f"train_batch_size={args.batch}", f"max_steps={args.warmup + args.steps}", f"network.rank={args.rank}",
        f"network.alpha={args.rank}", f"network.text_encoder_rank={args.rank}", f"mixed_precision={args.dtype}",
        "concept.tokens=<cat1> <cat2>", "concept.init_word=cat", "concept.placeholder=<TOK>", "logging=none",
        "checkpointing_steps=0", "checkpoint_at_end=false", "sample_every=0",
    ])
    with contextlib.redirect_stdout(sys.stderr):
        res = train(cfg, pipe=pipe)
    return {"step_s": statistics.median(res.step_seconds[args.warmup:])}


def _adapters(pipe, work: Path, n: int, rank: int, network: str = "lora") -> list[str]:
    from lorakit.adapters.io import save_adapter
    from lorakit.testing import random_adapter

    files = []
    for i in range(n):
        files.append(str(work / f"{network}{rank}_{i}.safetensors"))
        if not Path(files[-1]).exists():
            save_adapter(random_adapter(pipe, network=network, rank=rank, alpha=rank, conv_rank=rank,
                                        conv_alpha=rank, seed=i, std=0.01), files[-1])
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


def _sample_steps(args) -> tuple[int, int, int]:
    """Steps of the warm-up image (0: none), the short and the long timed image."""
    short = args.sample_steps
    return short if args.warmup_steps is None else args.warmup_steps, short, args.sample_steps_long or 2 * short


_WARMED: set[str] = set()  # sampling methods already run in this process (--warmup-once)


def _sample(args, pipe, work: Path, method: str) -> dict:
    """One warm-up image, then one at S and one at L steps: total seconds of the L run, and the marginal seconds
    per step ``(t(L) - t(S)) / (L - S)`` (without the fixed cost: adapter loading, prompt encoding, VAE decode,
    PNG + sidecar)."""
    files = _adapters(pipe, work, args.n_loras, args.rank)
    kinds = ["--kinds", *(("character", "style", "clothing", "object")[i % 4] for i in range(len(files)))] \
        if method == "cmlora" else []
    steps, times = _sample_steps(args), []
    skip_warmup = args.warmup_once and method in _WARMED
    _WARMED.add(method)
    for i, n in enumerate(steps):  # the first warms up (lazy imports, first-call allocations)
        if i == 0 and (skip_warmup or n == 0):
            times.append(None)
            continue
        times.append(_patched_cli(pipe, ["sample", "--base", "bench", "--adapters", *files, "--method", method,
                                         *kinds, "--prompt", "a photo of a cat", "--steps", str(n), "--size",
                                         str(args.resolution), "--dtype", args.dtype, "--out", str(work / f"s{i}"),
                                         "--no-memory-check"]))
        pipe.unload_lora_weights()
    return {"total_s": times[2], "step_s": (times[2] - times[1]) / (steps[2] - steps[1]), "steps": steps[2],
            "short_s": times[1], "short_steps": steps[1], "warmed_up": times[0] is not None}


def _sample_ref(args, pipe, work: Path) -> dict:
    import torch
    from peft import LoraConfig

    from lorakit.blocks import lora_able_modules, module_ranks, resolve_block_spec
    from lorakit.models import pipeline_arch

    # The modules random_adapter (lorakit's runs) adapts: "all" blocks, LoRA.
    targets = list(module_ranks(lora_able_modules(pipe.unet), resolve_block_spec("all", pipeline_arch(pipe), args.rank),
                                "lora", args.rank, args.rank))
    names = []
    for i in range(args.n_loras):
        torch.manual_seed(i)
        pipe.unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets,
                                         init_lora_weights=False), adapter_name=f"a{i}")
        names.append(f"a{i}")
    pipe.unet.set_adapters(names, [1.0] * len(names))
    pipe.to(dtype=_torch_dtype(args.dtype))
    steps, times = _sample_steps(args), []
    for n in steps:  # as _sample: warm-up, S, L
        if n == 0:
            times.append(None)
            continue
        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe("a photo of a cat", num_inference_steps=n, height=args.resolution, width=args.resolution,
                 guidance_scale=7.5, generator=gen, output_type="np")
        times.append(time.perf_counter() - t0)
    return {"total_s": times[2], "step_s": (times[2] - times[1]) / (steps[2] - steps[1]), "steps": steps[2]}


def _cli_dtype(args) -> str:
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[args.dtype]


def _fuse(args, pipe, work: Path) -> dict:
    files = _adapters(pipe, work, args.n_loras, args.rank, args.network)
    out = work / "fused.safetensors"
    total = _patched_cli(pipe, ["fuse", "--method", "gradient", "--base", "bench", "--adapters", *files, "--out",
                                str(out), "--out-format", "adapter", "--steps", str(args.fuse_steps), "--resolution",
                                str(args.resolution), "--dtype", _cli_dtype(args), "--ridge", args.fuse_ridge,
                                "--capture-batch", str(args.capture_batch), "--quiet", "--no-memory-check"])
    report = json.loads(out.with_name(out.stem + ".fusion.json").read_text())
    summary = report.get("summary", {})
    fallback = summary.get("fallback_layers") or []
    return {"total_s": total, "layers": summary.get("layers"), "fallback_layers": len(fallback),
            "fallback_examples": fallback[:3], "subspace_layers": len(summary.get("subspace_layers") or []),
            "by_kind": layers_by_kind(pipe, report.get("layers", {})), "ridge": args.fuse_ridge,
            "capture_s": summary.get("capture_s"), "solve_s": summary.get("solve_s")}


def layer_kind(pipe, key: str) -> str:
    """``linear``, ``conv1x1`` or ``conv`` (a larger kernel) for an adapter key of ``pipe``."""
    import torch

    comp, path = key.split(".", 1)
    try:
        module = getattr(pipe, comp).get_submodule(path)
    except AttributeError:
        return "unknown"
    if isinstance(module, torch.nn.Conv2d):
        return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv"
    return "linear"


def layers_by_kind(pipe, layers: dict) -> dict:
    """Per layer kind: how many layers gradient fusion solved on their full input (``solved``), within the LoRA
    subspace (``subspace``) or replaced by the weighted average (``fallback``), from its report's ``layers``."""
    out: dict[str, dict[str, int]] = {}
    for key, rep in layers.items():
        how = "fallback" if rep.get("method") != "closed_form" else ("subspace" if "space" in rep else "solved")
        counts = out.setdefault(layer_kind(pipe, key), {"solved": 0, "subspace": 0, "fallback": 0})
        counts[how] += 1
    return out


def _ziplora(args, pipe, work: Path) -> dict:
    """ZipLoRA of one pair: generated references (``--ref-num`` images of ``--ref-steps`` steps per LoRA), then
    the coefficient optimisation; run at ``--zip-steps`` S and 2S optimisation steps, marginal seconds per step."""
    files = _adapters(pipe, work, 2, args.rank)
    times = []
    for i, steps in enumerate((args.zip_steps, 2 * args.zip_steps)):
        times.append(_patched_cli(pipe, [
            "fuse", "--method", "ziplora", "--base", "bench", "--adapters", *files, "--out", str(work / f"zip{i}.safetensors"),
            "--steps", str(steps), "--ref-num", str(args.ref_num), "--ref-steps", str(args.ref_steps), "--ref-size",
            str(args.resolution), "--dtype", _cli_dtype(args), "--quiet", "--no-memory-check"]))
        pipe.unload_lora_weights()
    step_s = (times[1] - times[0]) / args.zip_steps
    return {"total_s": times[1], "step_s": step_s, "steps": 2 * args.zip_steps, "ref_num": args.ref_num,
            "ref_steps": args.ref_steps, "fixed_s": times[0] - args.zip_steps * step_s}


def _lorarar(args, pipe, work: Path) -> dict:
    """LoRA.rar of one pair: one forward pass of a hypernetwork (random weights: the cost is a trained one's)
    over the pair's columns. Needs no base: its own memory is ``peak - rss_before``."""
    from lorakit.adapters.io import load_adapter
    from lorakit.fusion.lorarar import MergerHypernet, hypernet_widths, save_hypernet
    from lorakit.fusion.ziplora import plan_merge

    files = _adapters(pipe, work, 2, args.rank)
    net = MergerHypernet(hypernet_widths([plan_merge(load_adapter(files[0]), load_adapter(files[1]))]))
    save_hypernet(net, work / "hypernet.safetensors")
    rss_before = _reset_peak()  # the pair and the hypernetwork were made here; what is measured is the command
    total = _patched_cli(pipe, ["fuse", "--method", "lorarar", "--hypernet", str(work / "hypernet.safetensors"),
                                "--adapters", *files, "--out", str(work / "rar.safetensors"), "--quiet"])
    return {"total_s": total, "rss_before_fuse_mb": round(rss_before, 1)}


def _estimate_mb(args, stage: str) -> float | None:
    from lorakit.memory import estimate

    arch, size, _, _ = SIZES[args.size]
    base = f"random:{arch}:{size}"
    kind = {"train_edlora": "edlora", "train_ref_edlora": "edlora", "train_ref_edlora_layers": "edlora",
            "fuse": "fuse-gradient", "ziplora": "ziplora", "lorarar": "ziplora"}.get(
        stage, "train" if stage.startswith("train") else "sample")
    batch = {"sample": 1, "fuse-gradient": args.capture_batch}.get(kind, args.batch)
    est = estimate(kind, base, resolution=args.resolution, batch=batch, heldout=args.fuse_ridge == "auto",
                   rank=args.rank, n_loras=args.n_loras if stage in N_STAGES else 2, dtype=_torch_dtype(args.dtype),
                   method=_SAMPLE_METHOD.get(stage, "merge"), cfg=kind != "fuse-gradient",
                   gradient_checkpointing=stage.endswith("_gc"),
                   conv=stage.endswith("_locon") or (stage == "fuse" and args.network == "locon"))
    return round(est.total / 2**20, 1) if est else None


def run_point(args, pipe, work: Path) -> dict:
    """One stage at one (resolution, rank, N) on the built base; its result fields."""
    stage = args.one
    if stage in TRAIN or stage in TRAIN_REFS.values() or stage in EXTRA_REFS.values():
        return _train(args, pipe, work, stage)
    if stage == "sample_ref":
        return _sample_ref(args, pipe, work)
    if stage in _SAMPLE_METHOD:
        return _sample(args, pipe, work, _SAMPLE_METHOD[stage])
    return {"fuse": _fuse, "ziplora": _ziplora, "lorarar": _lorarar}[stage](args, pipe, work)


def run_points(args, points: list[dict], emit) -> None:
    """Build the base once, then run each point (a dict of stage / resolution / rank / n_loras) in order; the
    peak RSS of each is the process's peak since a reset just before it (the first: since the start)."""
    import torch

    from lorakit.models import sized_pipeline

    torch.set_num_threads(args.threads)
    arch, size, _, _ = SIZES[args.size]
    t0 = time.perf_counter()
    pipe = sized_pipeline(arch, size, seed=0, dtype=_torch_dtype(args.dtype))
    build_s, rss_built = time.perf_counter() - t0, _status_mb("VmRSS")
    params = sum(p.numel() for p in pipe.unet.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        for i, point in enumerate(points):
            for key, value in point.items():
                setattr(args, key, value)
            rss_before = _reset_peak() if i else rss_built  # the first point's peak includes the build, as before
            work = Path(tmp) / f"p{i}"
            work.mkdir()
            load = os.getloadavg()[0]
            with PeakAnon() as anon:
                res = run_point(args, pipe, work)
            peak = _status_mb("VmHWM")
            load = round((load + os.getloadavg()[0]) / 2, 1)  # the machine's 1-min load average (2 cores here)
            row = {"run": args.one, "size": args.size, "arch": arch, "resolution": args.resolution,
                   "dtype": args.dtype, "batch": args.batch, "rank": args.rank,
                   "n_loras": args.n_loras if args.one in N_STAGES else (2 if args.one in ("ziplora", "lorarar") else None),
                   "network": args.network if args.one == "fuse" else None,
                   "unet_params_m": round(params / 1e6, 1), "threads": args.threads, "build_s": round(build_s, 2),
                   "shared_process": len(points) > 1, "point": i,
                   **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()},
                   "rss_after_build_mb": round(rss_built, 1), "rss_before_mb": round(rss_before, 1),
                   "peak_rss_mb": round(peak, 1), "peak_anon_mb": round(anon.peak_mb, 1),
                   "file_rss_mb": round(_status_mb("RssFile"), 1), "load_avg": load}
            row = {k: v for k, v in row.items() if v is not None}
            row["estimate_mb"] = _estimate_mb(args, args.one) if args.estimate else None
            emit(row)


def _default_point(row: dict) -> bool:
    """The row was run at its size's default resolution, rank 4 and (for N-dependent stages) N = 2."""
    return (row.get("resolution", SIZES[row["size"]][2]) == SIZES[row["size"]][2] and row.get("rank", RANK) == RANK
            and row.get("n_loras", 2) in (2, None) and row.get("network", "lora") == "lora")


def _time(row: dict) -> float:
    return row["step_s"] if "step_s" in row else row["total_s"]


# lorakit against its reference at the same point: (lorakit stage, reference stage, the time compared)
COMPARISONS = (("train", "train_ref", "step_s"), ("sample", "sample_ref", "step_s"), ("cmlora", "composite", "total_s"),
               *((s, ref, "step_s") for s, ref in (*TRAIN_REFS.items(), *EXTRA_REFS.items())))
AXES = (("n_loras", 4), ("resolution", 2), ("rank", 3))  # curve axes and their place in a point's key


def _key(r: dict) -> tuple:
    """``(size, stage, resolution, rank, n_loras, network, steps)`` of a row: the point it measured (steps: of a
    sampling image)."""
    return r["size"], r["run"], r.get("resolution"), r.get("rank"), r.get("n_loras"), r.get("network"), r.get("steps")


def _where(key: tuple) -> dict:
    """The point's resolution / rank / N, for a derived row (those the runs recorded)."""
    return {k: v for k, v in zip(("resolution", "rank", "n_loras"), key[2:5]) if v is not None}


def derived_rows(rows: list[dict]) -> list[dict]:
    """``ratio`` rows (lorakit / reference, each variant / its plain stage, CMLoRA / Composite: at each point
    both ran in one bench invocation (rows' ``bench``), means of its repeats), ``paired_ratio`` rows (the k-th
    runs of both arms of one invocation), ``growth`` rows (each size / tiny at the default point), ``curve``
    rows (time and peak RSS against N, resolution and rank, the other two fixed, each / its smallest value) and
    ``spread`` rows (the repeats of one point: mean, min, max)."""
    ok = [r for r in rows if "error" not in r]
    groups, ratios = _groups(ok), []
    # A ratio compares two arms under the same load, so only rows of one bench invocation are paired.
    for bench in dict.fromkeys(r.get("bench") for r in ok):
        same = _groups([r for r in ok if r.get("bench") == bench])
        found = _ratio_rows(same, _means(same)) + _paired_ratios(same)
        ratios += [{**r, "bench": bench} for r in found] if bench is not None else found
    return ratios + _growth_rows(ok) + _spread_rows(groups) + _curve_rows(groups, _means(groups))


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_key(r), []).append(r)
    return groups


def _means(groups: dict[tuple, list[dict]]) -> dict[tuple, tuple[float, float]]:
    """Per point: the mean time and the mean peak RSS of its runs."""
    import statistics

    return {k: (statistics.mean(_time(r) for r in rs), statistics.mean(r["peak_rss_mb"] for r in rs))
            for k, rs in groups.items()}


def _ratio_rows(groups: dict[tuple, list[dict]], mean: dict) -> list[dict]:
    import statistics

    out = []
    # (stage, its reference, "vs" shown, time compared): sampling variants by the whole image
    comparisons = [(a, b, None, f) for a, b, f in COMPARISONS[:2]] + [(a, b, b, f) for a, b, f in COMPARISONS[2:]]
    comparisons += [(s, "train", "train", "step_s") for s in TRAIN[2:]]
    comparisons += [(s, "sample", "sample", "total_s") for s in SAMPLE[2:]]
    for key in sorted(groups, key=str):
        for lk, ref, vs, field in comparisons:
            if key[1] != lk:
                continue
            other = (key[0], ref, *key[2:])
            if ref.startswith("train") and other not in groups:  # trainers record no N
                other = (key[0], ref, key[2], key[3], None, *key[5:])
            if other not in groups:
                continue
            ta, tb = (statistics.mean(r.get(field, _time(r)) for r in groups[k]) for k in (key, other))
            pa, pb = mean[key][1], mean[other][1]
            row = {"run": "ratio", "size": key[0], "stage": lk, **({"vs": vs} if vs else {}), **_where(key),
                   "time_ratio": round(ta / tb, 3), "peak_rss_ratio": round(pa / pb, 3)}
            anon = [[r["peak_anon_mb"] for r in groups[k] if "peak_anon_mb" in r] for k in (key, other)]
            if vs is None and all(anon):
                row["peak_anon_ratio"] = round(statistics.mean(anon[0]) / statistics.mean(anon[1]), 3)
            out.append(row)
    return out


def _growth_rows(ok: list[dict]) -> list[dict]:
    out = []
    by = {(r["size"], r["run"]): r for r in ok if _default_point(r)}
    for (size, stage), r in sorted(by.items()):
        base = by.get(("tiny", stage))
        if base and size != "tiny":
            out.append({"run": "growth", "size": size, "stage": stage,
                        "params_x": round(r["unet_params_m"] / base["unet_params_m"], 1),
                        "time_x": round(_time(r) / _time(base), 1),
                        "peak_rss_x": round(r["peak_rss_mb"] / base["peak_rss_mb"], 2)})
    return out


def _spread_rows(groups: dict[tuple, list[dict]]) -> list[dict]:
    import statistics

    out = []
    for (size, stage, res, rank, n, net, _), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if len(rs) > 1:
            peaks, times = [r["peak_rss_mb"] for r in rs], [_time(r) for r in rs]
            anon = [r["peak_anon_mb"] for r in rs if "peak_anon_mb" in r]
            out.append({"run": "spread", "size": size, "stage": stage, "resolution": res, "rank": rank, "n": len(rs),
                        "peak_rss_mb_mean": round(statistics.mean(peaks), 1), "peak_rss_mb_min": min(peaks),
                        "peak_rss_mb_max": max(peaks), "time_s_mean": round(statistics.mean(times), 3),
                        "time_s_min": min(times), "time_s_max": max(times),
                        **({"peak_anon_mb_mean": round(statistics.mean(anon), 1), "peak_anon_mb_min": min(anon),
                            "peak_anon_mb_max": max(anon)} if anon else {})})
    return out


def _curve_rows(groups: dict[tuple, list[dict]], mean: dict) -> list[dict]:
    import statistics

    out = []
    # Curves: sampling by the whole image (its per-step marginal is a difference of two noisy totals), the
    # others by step (training) or in total (fusion); one series per value of the two other axes.
    image = {k: (statistics.mean(r["total_s"] if r["run"] in SAMPLE else _time(r) for r in rs), mean[k][1])
             for k, rs in groups.items()}
    for axis, pos in AXES:
        series: dict[tuple, list[tuple]] = {}
        for key, (t, peak) in image.items():
            if key[pos] is None or key[5] not in (None, "lora"):
                continue
            fixed = tuple((name, key[i]) for name, i in (*AXES, ("steps", 6)) if i != pos and key[i] is not None)
            series.setdefault((key[0], key[1], fixed), []).append((key[pos], t, peak))
        for (size, stage, fixed), pts in sorted(series.items(), key=str):
            if len(pts) < 2:
                continue
            pts.sort()
            x0, t0, p0 = pts[0]
            for x, t, peak in pts:
                out.append({"run": "curve", "size": size, "stage": stage, "axis": axis, "at": dict(fixed), "x": x,
                            "time_s": round(t, 3), "peak_rss_mb": round(peak, 1), "time_x": round(t / t0, 2),
                            "peak_rss_x": round(peak / p0, 3)})
    return out


def _paired_ratios(groups: dict[tuple, list[dict]]) -> list[dict]:
    """``paired_ratio`` rows: with repeats, the k-th lorakit run against the k-th reference run at the same point
    (``--repeat`` interleaves them, so each pair ran under about the same load); per-pair ratios, mean, min, max."""
    import statistics

    out = []
    for key, a in sorted(groups.items(), key=lambda kv: str(kv[0])):
        for lk, ref, field in COMPARISONS:
            if key[1] != lk:
                continue
            b = groups.get((key[0], ref, *key[2:]), [])
            if min(len(a), len(b)) < 2:
                continue
            time_r = [round(x[field] / y[field], 3) for x, y in zip(a, b)]
            total_r = [round(x["total_s"] / y["total_s"], 3) for x, y in zip(a, b) if "total_s" in x and "total_s" in y]
            peak_r = [round(x["peak_rss_mb"] / y["peak_rss_mb"], 4) for x, y in zip(a, b)]
            out.append({"run": "paired_ratio", "size": key[0], "stage": lk, "vs": ref, **_where(key), "time": field,
                        "pairs": len(time_r), "time_ratios": time_r, "time_ratio_mean": round(statistics.mean(time_r), 3),
                        "time_ratio_min": min(time_r), "time_ratio_max": max(time_r),
                        "total_ratios": total_r, "peak_rss_ratios": peak_r,
                        "peak_rss_ratio_max": max(peak_r),
                        "peak_rss_mb_diff": [round(x["peak_rss_mb"] - y["peak_rss_mb"], 1) for x, y in zip(a, b)]})
    return out


def _seconds(r: dict) -> str:
    if r["run"].startswith("train"):
        times = r.get("step_times") or []
        return f"{r['step_s']:.2f} /step" + (f" ({min(times):.2f}-{max(times):.2f})" if len(times) > 1 else "")
    if r["run"] in SAMPLE:
        return f"{r['total_s']:.1f} /image of {r['steps']} steps ({r['step_s']:.2f} /step marginal)"
    if r["run"] == "ziplora":
        return f"{r['total_s']:.1f} total, {r['steps']} steps ({r['step_s']:.2f} /step, {r['fixed_s']:.1f} fixed)"
    if r["run"] == "fuse" and "capture_s" in r:
        return (f"{r['total_s']:.1f} total (capture {r['capture_s']:.0f}, solve {r['solve_s']:.0f}; ridge {r.get('ridge')}; "
                f"{r.get('layers')} layers, {r.get('fallback_layers')} fallback)")
    return f"{r['total_s']:.1f} total"


def _at(r: dict) -> str:
    """Where a derived row compares: its point, and the bench invocation both arms ran in."""
    at = ", ".join(f"{k} {r[k]}" for k in ("resolution", "n_loras", "rank") if k in r)
    return at + (f"; run {r['bench']}" if r.get("bench") else "")


def markdown(rows: list[dict]) -> str:
    """The tables of docs/performance.md from a file's runs and derived rows: every run, the ratios, the pairs,
    the curves."""
    runs = [r for r in rows if r.get("run") in STAGES]
    derived = [r for r in rows if r.get("run") in ("ratio", "paired_ratio", "curve")]
    lines = ["| stage | px | N | rank | seconds | peak RSS MiB | estimate MiB | load |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['run']} | {r.get('resolution')} | {r.get('n_loras', '-')} | {r.get('rank')} | "
                         f"**{r['error']}** | {r.get('max_rss_seen_mb', '-')} | - | - |")
            continue
        lines.append(f"| {r['run']} | {r['resolution']} | {r.get('n_loras', '-')} | {r['rank']} | {_seconds(r)} | "
                     f"{r['peak_rss_mb']:.0f} | {r.get('estimate_mb') or '-'} | {r.get('load_avg', '-')} |")
    lines += ["", "| ratio | at | time | peak RSS |", "|---|---|---|---|"]
    for r in (r for r in derived if r["run"] == "ratio"):
        at = _at(r)
        vs = r.get("vs") or {"train": "train_ref", "sample": "sample_ref"}[r["stage"]]
        lines.append(f"| {r['stage']} / {vs} | {at} | {r['time_ratio']} | {r['peak_rss_ratio']} |")
    pairs = [r for r in derived if r["run"] == "paired_ratio"]
    if pairs:
        lines += ["", "| pairs | at | n | time ratio per pair | mean (min-max) | peak RSS ratio per pair |", "|---|---|---|---|---|---|"]
        for r in pairs:
            at = _at(r)
            lines.append(f"| {r['stage']} / {r['vs']} ({r['time']}) | {at} | {r['pairs']} | {r['time_ratios']} | "
                         f"{r['time_ratio_mean']} ({r['time_ratio_min']}-{r['time_ratio_max']}) | {r['peak_rss_ratios']} |")
    lines += _n_table(runs)
    curves = [r for r in derived if r["run"] == "curve"]
    if curves:
        lines += ["", "| curve | at | x: seconds / peak RSS MiB (x its smallest) |", "|---|---|---|"]
        series: dict[tuple, list[dict]] = {}
        for r in curves:
            series.setdefault((r["stage"], r["axis"], json.dumps(r["at"])), []).append(r)
        for (stage, axis, at), pts in series.items():
            cells = "; ".join(f"{p['x']}: {p['time_s']:.1f} s ({p['time_x']}x) / {p['peak_rss_mb']:.0f} ({p['peak_rss_x']}x)" for p in pts)
            where = ", ".join(f"{k} {v}" for k, v in json.loads(at).items())
            lines.append(f"| {stage} against {axis} | {where} | {cells} |")
    return "\n".join(lines) + "\n"


def _n_table(runs: list[dict]) -> list[str]:
    """Markdown lines: per resolution, image length and bench invocation, each sampling method's seconds per image
    / peak RSS MiB against N (means of the repeats), when more than one N ran (one invocation per table: its
    points share a load)."""
    import statistics

    points: dict[tuple, dict[str, dict[int, list[dict]]]] = {}
    for r in runs:
        if r["run"] in SAMPLE and "error" not in r and r.get("n_loras"):
            by_stage = points.setdefault((r["resolution"], r["steps"], r.get("bench") or ""), {})
            by_stage.setdefault(r["run"], {}).setdefault(r["n_loras"], []).append(r)
    lines = []
    for (px, steps, bench), by_stage in sorted(points.items()):
        ns = sorted({n for by_n in by_stage.values() for n in by_n})
        if len(ns) < 2:
            continue
        run = f" (run {bench})" if bench else ""
        lines += ["", f"| {px} px, {steps}-step image{run}: s / peak RSS MiB | " + " | ".join(f"N = {n}" for n in ns) + " |",
                  "|---" * (len(ns) + 1) + "|"]
        for stage, by_n in by_stage.items():
            cells = [f"{statistics.mean(r['total_s'] for r in by_n[n]):.1f} / "
                     f"{statistics.mean(r['peak_rss_mb'] for r in by_n[n]):.0f}" if n in by_n else "-" for n in ns]
            lines.append(f"| {_SAMPLE_METHOD[stage] if stage in _SAMPLE_METHOD else stage} | " + " | ".join(cells) + " |")
    return lines


MARKERS = ("<!-- tables: bench_scale --derive --markdown -->\n", "<!-- end tables -->\n")


def write_tables(md: Path, tables: str) -> None:
    """Replace what lies between the two MARKERS lines of ``md`` with ``tables`` (written to a temporary file
    beside it, then renamed)."""
    text = md.read_text()
    if MARKERS[0] not in text or MARKERS[1] not in text:
        raise SystemExit(f"{md}: no '{MARKERS[0].strip()}' ... '{MARKERS[1].strip()}' lines to put the tables between")
    i, j = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(text[:i] + tables + text[j:])
    os.replace(tmp, md)


def plot(rows: list[dict], png: Path) -> Path:
    """One PNG: time (top) and peak RSS (bottom) against N, resolution and rank (the ``curve`` rows)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit("--plot needs matplotlib: pip install 'lorakit[bench]'") from err
    curves = [r for r in rows if r.get("run") == "curve"]
    axes_names = [a for a in ("n_loras", "resolution", "rank") if any(r["axis"] == a for r in curves)]
    if not axes_names:
        raise SystemExit("--plot: no curve to draw (no stage ran at two values of N, resolution or rank)")
    fig, axs = plt.subplots(2, len(axes_names), figsize=(3.2 * len(axes_names), 5.2), squeeze=False)
    labels = {"n_loras": "LoRAs N", "resolution": "pixels", "rank": "rank"}
    for j, axis in enumerate(axes_names):
        on_axis = [r for r in curves if r["axis"] == axis]
        for stage, at in dict.fromkeys((r["stage"], json.dumps(r.get("at", {}))) for r in on_axis):
            pts = [r for r in on_axis if r["stage"] == stage and json.dumps(r.get("at", {})) == at]
            xs = [r["x"] for r in pts]
            label = {"sample": "merge", "train": "train (lorakit)", "train_ref": "train (reference)"}.get(stage, stage)
            if len({json.dumps(r.get("at", {})) for r in on_axis if r["stage"] == stage}) > 1:
                label += " " + ", ".join(f"{k[0] if k != 'n_loras' else 'N'}={v}" for k, v in json.loads(at).items())
            axs[0][j].plot(xs, [r["time_s"] for r in pts], marker="o", label=label)
            axs[1][j].plot(xs, [r["peak_rss_mb"] / 1024 for r in pts], marker="o", label=label)
        for i in (0, 1):
            axs[i][j].set_xscale("log", base=2)
            axs[i][j].set_xticks(sorted({r["x"] for r in curves if r["axis"] == axis}))
            axs[i][j].get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            axs[i][j].grid(alpha=0.3)
        axs[1][j].set_xlabel(labels[axis])
        axs[0][j].legend(fontsize=7)
    axs[0][0].set_ylabel("seconds (sampling: per image)")
    axs[1][0].set_ylabel("peak RSS (GiB)")
    fig.suptitle("SD 1.5 size, CPU, bf16, one thread", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    return png


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["tiny", "mid", "sd15"])
    p.add_argument("--stages", nargs="+", choices=STAGES, default=["train_ref", "train", "sample_ref", "sample",
                                                                   "composite", "fuse"])
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: fp32 tiny/mid, bf16 sd15/sdxl")
    p.add_argument("--resolutions", nargs="+", type=int, help="pixels (default: 32 tiny/mid, 128 sd15/sdxl: 16x16 latents)")
    p.add_argument("--ranks", nargs="+", type=int, default=[RANK], help="LoRA ranks (every LoRA of a point)")
    p.add_argument("--n-loras", nargs="+", type=int, default=[2], help="LoRAs of the sampling and gradient-fusion stages")
    p.add_argument("--repeat", type=int, default=1, help="run every point this many times (in its own process)")
    p.add_argument("--shared", action="store_true", help="run the points of the stages that leave the base unchanged "
                   f"({', '.join(SHAREABLE)}) in one process per size (one build), peak RSS reset before each; "
                   "with --repeat the repeats run in it one after another (A B A B)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="timed training steps (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--sample-steps", type=int, default=2, help="sampling: steps of the short timed image (S)")
    p.add_argument("--sample-steps-long", type=int, help="sampling: steps of the long timed image (default 2S)")
    p.add_argument("--warmup-steps", type=int, help="sampling: steps of the warm-up image (default S; 0: none, the "
                   "short image is then the process's first)")
    p.add_argument("--warmup-once", action="store_true", help="sampling with --shared: the warm-up image only "
                   "at a method's first point in the process (later points of it are already warm)")
    p.add_argument("--fuse-steps", type=int, default=2, help="gradient fusion: sampling steps recorded per prompt")
    p.add_argument("--network", choices=["lora", "locon"], default="lora",
                   help="gradient fusion's random adapters: lora (linear + 1x1 convs) or locon (every conv too)")
    p.add_argument("--fuse-ridge", default="auto", help="gradient fusion: --ridge (auto keeps held-out Grams too)")
    p.add_argument("--capture-batch", type=int, default=8, help="gradient fusion: prompts x seeds per forward pass")
    p.add_argument("--max-rss-mb", type=float, help="kill a point's process when its RSS passes this (MiB); the "
                   "row then says so with the highest RSS seen")
    p.add_argument("--zip-steps", type=int, default=2, help="ziplora: optimisation steps of the short run (S; then 2S)")
    p.add_argument("--ref-num", type=int, default=1, help="ziplora: reference images per LoRA")
    p.add_argument("--ref-steps", type=int, default=2, help="ziplora: sampling steps per reference image")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no-estimate", dest="estimate", action="store_false", help="skip lorakit.memory's estimate")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per point")
    p.add_argument("--out", help="append JSON lines here too (e.g. runs/scale.jsonl)")
    p.add_argument("--derive", metavar="JSONL", nargs="+", help="only print the ratio / growth / curve / spread rows "
                   "of the runs in these files")
    p.add_argument("--markdown", action="store_true", help="with --derive: print the runs, ratios, pairs and curves "
                   "as markdown tables (docs/performance.md) instead of JSON lines")
    p.add_argument("--docs", metavar="MD", help="with --derive: put the markdown tables between the marker lines "
                   "of this file (docs/performance.md) instead of printing them")
    p.add_argument("--plot", metavar="PNG", help="with --derive: draw the curve rows into this PNG (needs matplotlib)")
    p.add_argument("--cmlora-flops", type=int, metavar="STEPS", help="only count CMLoRA's and Composite's UNet FLOPs "
                   "for an image of STEPS steps (meta device, seconds) at --resolutions and --n-loras, first --sizes")
    p.add_argument("--one", choices=STAGES, help=argparse.SUPPRESS)  # internal: run points in this process
    p.add_argument("--size", choices=list(SIZES), help=argparse.SUPPRESS)
    p.add_argument("--points", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def cmlora_flops(arch: str, size: str, pixels: int, n_loras: int, steps: int) -> dict:
    """CMLoRA's UNet FLOPs against Composite's for one image (CFG batch 2, default plan), counted on the meta
    device: a full and a shallow (cached) pass of the split UNet, times the passes of each kind in the plan."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lorakit.memory import meta_models
    from lorakit.sampling.cache import unet_split_forward
    from lorakit.sampling.schedules import cmlora_plan

    _, models = meta_models(f"random:{arch}:{size}")
    unet, dev = models["unet"], torch.device("meta")
    if arch == "sdxl":
        raise SystemExit("--cmlora-flops: SD1 layouts only")
    lat = pixels // 8
    x = torch.empty(2, unet.config.in_channels, lat, lat, device=dev)
    ehs = torch.empty(2, 77, unet.config.cross_attention_dim, device=dev)
    t = torch.tensor([500, 500], device=dev)
    with FlopCounterMode(display=False) as fc:
        _, deep = unet_split_forward(unet, x, t, ehs, 1)
    full = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        unet_split_forward(unet, x, t, ehs, 1, deep_feature=deep)
    shallow = fc.get_total_flops()
    plan = cmlora_plan(steps, list(range(n_loras)), n_loras)
    n_full = sum(sum(row) for row in plan.full)
    n_shallow = steps * n_loras - n_full
    return {"run": "cmlora_flops", "size": size, "arch": arch, "resolution": pixels, "n_loras": n_loras, "steps": steps,
            "full_pass_gflop": round(full / 1e9, 1), "shallow_pass_gflop": round(shallow / 1e9, 1),
            "full_passes": n_full, "shallow_passes": n_shallow,
            "cmlora_over_composite": round((n_full * full + n_shallow * shallow) / (steps * n_loras * full), 3)}


def _emit(row: dict, out: Path | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(line + "\n")


def plan(args) -> list[tuple[str, list[dict]]]:
    """``[(size, [point, ...]), ...]``: one entry per process."""
    procs = []
    for size in args.sizes:
        shared = []
        # Repeats outermost: every stage once, then again, so the arms of a comparison (train_ref / train)
        # interleave and share the machine's load as it drifts.
        for _ in range(args.repeat):
            for n in args.n_loras:  # the first N of --n-loras first, every stage at it, then the next N
                for stage in args.stages:
                    if stage not in N_STAGES and n != args.n_loras[0]:
                        continue
                    for res in args.resolutions or [SIZES[size][2]]:
                        for rank in args.ranks:
                            point = {"one": stage, "resolution": res, "rank": rank,
                                     "n_loras": n if stage in N_STAGES else 2}
                            if args.shared and stage in SHAREABLE:
                                shared.append(point)
                            else:
                                procs.append((size, [point]))
        if shared:
            procs.append((size, shared))
    return procs


class RssGuard:
    """Poll a child process's RSS every 0.2 s; kill it when it passes ``limit_mb`` (``tripped``, ``peak_mb``)."""

    def __init__(self, proc, limit_mb: float):
        self.proc, self.limit_mb, self.peak_mb, self.tripped = proc, limit_mb, 0.0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.wait(0.2):
            try:
                with open(f"/proc/{self.proc.pid}/status") as f:
                    rss = next((int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmRSS:")), 0.0)
            except OSError:
                return
            self.peak_mb = max(self.peak_mb, rss)
            if rss > self.limit_mb:
                self.tripped = True
                self.proc.kill()
                return

    def stop(self):
        self._stop.set()
        self._thread.join()


def _run_process(args, size: str, points: list[dict], env: dict, out: Path | None) -> list[dict]:
    cmd = [sys.executable, __file__, "--size", size, "--points", json.dumps(points), "--one", points[0]["one"],
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup), "--sample-steps",
           str(args.sample_steps), "--fuse-steps", str(args.fuse_steps), "--network", args.network, "--zip-steps",
           str(args.zip_steps), "--ref-num", str(args.ref_num), "--ref-steps", str(args.ref_steps),
           "--threads", str(args.threads), "--fuse-ridge", args.fuse_ridge, "--capture-batch", str(args.capture_batch)]
    cmd += ["--warmup-once"] if args.warmup_once else []
    for flag, value in (("--dtype", args.dtype), ("--sample-steps-long", args.sample_steps_long),
                        ("--warmup-steps", args.warmup_steps)):
        cmd += [flag, str(value)] if value is not None else []
    cmd += [] if args.estimate else ["--no-estimate"]
    rows, t0 = [], time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        timer = threading.Timer(args.timeout * len(points), proc.kill)
        timer.start()
        guard = RssGuard(proc, args.max_rss_mb) if args.max_rss_mb else None
        for line in proc.stdout:
            if line.startswith("ROW "):
                row = {**json.loads(line[4:]), "bench": args.bench, "wall_s": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                _emit(row, out)
        proc.wait()
        timer.cancel()
        if guard is not None:
            guard.stop()
        err.seek(0)
        tail = (err.read().strip().splitlines() or ["no output"])[-1][:300]
    if guard is not None and guard.tripped:
        tail = f"stopped: RSS {guard.peak_mb:.0f} MiB passed --max-rss-mb {args.max_rss_mb:.0f}"
    elif proc.returncode == -9:
        tail = "timeout"
    for point in points[len(rows):]:
        row = {"run": point["one"], "size": size, "resolution": point["resolution"], "rank": point["rank"],
               "error": tail, "bench": args.bench, "wall_s": round(time.perf_counter() - t0, 1)}
        if point["one"] in (*N_STAGES, "ziplora", "lorarar"):  # as the rows of finished points: trainers have no N
            row["n_loras"] = point["n_loras"]
        if guard is not None:
            row["max_rss_seen_mb"] = round(guard.peak_mb, 1)
        rows.append(row)
        _emit(row, out)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.points:
        _, _, px, dt = SIZES[args.size]
        args.dtype = args.dtype or dt
        real = sys.stdout

        def emit(row):
            print("ROW " + json.dumps(row), file=real, flush=True)

        with open(os.devnull, "w") as devnull:  # stdout carries the JSON rows only
            sys.stdout = devnull
            try:
                run_points(args, json.loads(args.points), emit)
            finally:
                sys.stdout = real
        return 0
    out = Path(args.out) if args.out else None
    if args.cmlora_flops:
        for px in args.resolutions or [SIZES[s][2] for s in args.sizes]:
            for n in args.n_loras:
                _emit({**cmlora_flops(*SIZES[args.sizes[0]][:2], px, n, args.cmlora_flops), "size": args.sizes[0]}, out)
        return 0
    if args.derive:
        runs = [json.loads(ln) for f in args.derive for ln in Path(f).read_text().splitlines() if ln.strip()]
        runs = [r for r in runs if r.get("run") in STAGES]  # the files' own derived rows are derived again
        derived = derived_rows(runs)
        if args.docs:
            write_tables(Path(args.docs), markdown(runs + derived))
        elif args.markdown:
            print(markdown(runs + derived), end="")
        for row in [] if args.markdown or args.docs else derived:
            _emit(row, out)
        if args.plot:
            print(f"wrote {plot(derived, Path(args.plot))}", file=sys.stderr)
        return 0
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    args.bench = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + f"/{os.getpid()}"  # this invocation
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "LORAKIT_NO_MEMORY_CHECK": "1"}
    rows = []
    for size, points in plan(args):
        rows += _run_process(args, size, points, env, out)
    for row in derived_rows(rows):
        _emit(row, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
