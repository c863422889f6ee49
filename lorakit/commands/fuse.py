"""``lorakit fuse --method METHOD --adapters A B ... --out OUT``: fuse several adapters into one model or adapter.

The methods, their help and their options come from :mod:`lorakit.fusion.registry`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lorakit.fusion.registry import METHODS
from lorakit.options import add_options, from_args, listing


def add_parser(sub) -> None:
    p = sub.add_parser(
        "fuse",
        help="fuse several LoRA/LoCon/ED-LoRA adapters: gradient fusion (Mix-of-Show) or weight merges",
        description="Fuse several adapters into one model or one adapter file.\n\nmethods (dW_i = adapter i's "
        "delta, w_i = its --weights value):\n" + listing(METHODS) + "\n\nMulti-GPU: accelerate launch -m lorakit.cli "
        "fuse ... splits the gradient method's activation capture between processes.",
    )
    p.add_argument("--method", required=True, choices=list(METHODS), help="fusion method (see above)")
    p.add_argument("--adapters", nargs="+", required=True, metavar="FILE", help="adapter .safetensors files")
    p.add_argument("--base", help="base model: diffusers folder, .safetensors checkpoint, hub id or tiny:ARCH "
                                  "(needed by gradient and by --out-format pipeline)")
    p.add_argument("--weights", nargs="+", type=float, metavar="W", help="one multiplier per adapter (default 1)")
    p.add_argument("--out", required=True, help="output: a folder (pipeline) or a .safetensors file (adapter)")
    p.add_argument("--out-format", choices=["auto", "pipeline", "adapter", "single-file"], default="auto",
                   help="pipeline: diffusers folder with the fused weights + lorakit_fusion.json; adapter: a "
                        "fused-delta .safetensors (W_fused - W0) + OUT.fusion.json; single-file: the fused SD1/SDXL "
                        "model as one original-layout .safetensors checkpoint (A1111, ComfyUI, diffusers "
                        "from_single_file) + OUT.fusion.json; auto: pipeline for gradient, adapter for the merges")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that lorakit wrote (never a file or folder it did not write, "
                        "never an input)")
    p.add_argument("--key-style", choices=["auto", "diffusers", "sai"], default="auto",
                   help="adapter output: kohya UNet names, sai (lora_unet_input_blocks_..., SDXL) or diffusers "
                        "(lora_unet_down_blocks_...); auto = sai for SDXL, diffusers for SD1/SD2 (docs/formats.md)")
    p.add_argument("--rank", type=int, help="truncate the written delta to this rank by SVD (default: exact)")
    p.add_argument("--prompts", nargs="+", metavar="PROMPTS",
                   help="one entry per adapter, several prompts separated by '|' (default: each file's trigger "
                        "metadata as 'photo of a {trigger}' and '{trigger}', else generic prompts with a warning)")
    p.add_argument("--template", default="photo of a {}", help="prompt template for trigger words")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling (gradient) and random drops (dare)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype the base is loaded and saved in (statistics and solves are float64)")
    p.add_argument("--no-memory-check", action="store_true",
                   help="start even when the memory estimate (lorakit.memory) exceeds the free RAM / VRAM")
    add_options(p.add_argument_group("method options"), [(name, m.settings) for name, m in METHODS.items()])
    p.set_defaults(func=run)


def _out_format(args) -> str:
    return METHODS[args.method].default_format if args.out_format == "auto" else args.out_format


def build_inputs(args):
    """Load the adapters and resolve weights and prompts (``FuseInputs``); the base is loaded on demand."""
    import torch
    from accelerate import PartialState

    from lorakit.adapters.io import load_adapter
    from lorakit.fusion import FuseInputs, concept_prompts, heldout_prompts

    paths = list(args.adapters)
    import math

    bad = [w for w in args.weights or [] if not math.isfinite(w)]
    if bad:
        raise ValueError(f"--weights {' '.join(map(str, args.weights))}: expected finite numbers, got {bad[0]}")
    if args.weights is not None and len(args.weights) != len(paths):
        raise ValueError(f"--weights has {len(args.weights)} values for {len(paths)} adapters; give one per adapter")
    if args.prompts is not None and len(args.prompts) != len(paths):
        raise ValueError(f"--prompts has {len(args.prompts)} entries for {len(paths)} adapters; give one per adapter "
                         "(several prompts for one adapter are separated by '|')")
    val_given = getattr(args, "val_prompts", None)
    if val_given is not None and len(val_given) != len(paths):
        raise ValueError(f"--val-prompts has {len(val_given)} entries for {len(paths)} adapters; give one per adapter")
    adapters = [load_adapter(p).as_lora() for p in paths]  # LoHa / LoKr layers as exact LoRA factors
    names = [Path(p).stem for p in paths]
    prompts, samples, sources = [], [], []
    for i, (ad, name) in enumerate(zip(adapters, names)):
        pr, sp, src = concept_prompts(ad, name, args.prompts[i] if args.prompts else None, args.template)
        prompts.append(pr)
        samples.append(sp)
        sources.append(src)
    cache = {}

    def load_pipe():
        if not args.base:
            return None
        if "pipe" not in cache:
            from lorakit.models import load_base

            pipe = load_base(args.base, torch_dtype=getattr(torch, args.dtype))
            cache["pipe"] = pipe.to(PartialState().device)
        return cache["pipe"]

    return FuseInputs(
        method=args.method, adapters=adapters, paths=paths, names=names,
        weights=list(args.weights) if args.weights else [1.0] * len(paths),
        prompts=prompts, sample_prompts=samples, rank=args.rank, seed=args.seed, load_pipe=load_pipe,
        settings=from_args(METHODS[args.method].settings, args),
        prompt_sources=sources,
        val_prompts=[heldout_prompts(ad, val_given[i] if val_given else None, args.prompts is not None)
                     for i, ad in enumerate(adapters)],
    )


def _inputs_report(inputs) -> list[dict]:
    return [
        {"path": p, "name": n, "weight": w, "kind": a.kind, "rank": max((m.rank for m in a.modules.values()), default=0),
         "modules": len(a.modules), "prompts": pr, "sample_prompts": sp, "prompt_source": src, "val_prompts": vp}
        for p, n, w, a, pr, sp, src, vp in zip(inputs.paths, inputs.names, inputs.weights, inputs.adapters,
                                               inputs.prompts, inputs.sample_prompts, inputs.prompt_sources,
                                               inputs.val_prompts or [[]] * len(inputs.paths))
    ]


def write_outputs(args, inputs, result, report: dict) -> Path:
    """Write the adapter file or the pipeline folder, plus the JSON report. Returns the output path."""
    from lorakit.adapters.io import Adapter, adapter_metadata, save_adapter
    from lorakit.fileio import write_json
    from lorakit.fusion.merge import _maybe_truncate, apply_deltas
    from lorakit.models import save_pipeline
    from lorakit.outputs import check_out_file

    out = Path(args.out)
    fmt = _out_format(args)
    if fmt == "adapter":
        if result.modules is None:
            raise ValueError(f"--method {args.method} produces no adapter delta; use --out-format pipeline")
        if out.suffix != ".safetensors":
            raise ValueError(f"--out {out}: an adapter output must end in .safetensors")
        check_out_file(out, args.overwrite, inputs=_input_paths(args))
        report_path = out.with_name(out.stem + ".fusion.json")
        check_out_file(report_path, args.overwrite, flag="--out (report)", inputs=_input_paths(args))
        modules = _maybe_truncate(result.modules, args.rank)
        if args.base:  # a base was given: never write a delta for layers it does not have
            from lorakit.fusion.merge import missing_layers

            missing = missing_layers(inputs.load_pipe(), modules)
            if missing:
                raise ValueError(f"--base {args.base} has no layer {missing[0]} ({len(missing)} of {len(modules)} "
                                 "fused modules); the adapters were made for another base")
        arch = next((a.arch for a in inputs.adapters if a.arch), None) or "sd1"
        triggers = [a.metadata["lorakit.trigger"] for a in inputs.adapters if a.metadata.get("lorakit.trigger")]
        meta = adapter_metadata(arch, "fused-delta", trigger=", ".join(triggers) or None,
                                rank=max(m.rank for m in modules.values()), alpha=None)
        meta["lorakit.fusion"] = json.dumps({"method": args.method, "inputs": [Path(p).name for p in inputs.paths],
                                             "weights": inputs.weights, "rank": args.rank})
        meta.update(result.metadata)
        save_adapter(Adapter(modules=modules, metadata=meta, extra=dict(result.extra)), out,
                     key_style=getattr(args, "key_style", "auto"))
        report["output"] = {"format": "adapter", "path": str(out), "modules": len(modules),
                            "ranks": sorted({m.rank for m in modules.values()})}
        write_json(report, report_path)
        return out
    if fmt == "single-file" and out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: a single-file checkpoint must end in .safetensors")
    pipe = result.pipeline
    if pipe is None:
        pipe = inputs.load_pipe()
        if pipe is None:
            raise ValueError(f"--out-format pipeline needs --base (the model to add the {args.method} delta to)")
        apply_deltas(pipe, _maybe_truncate(result.modules, args.rank))
    elif args.rank is not None:
        raise ValueError("--rank applies to --out-format adapter; a fused pipeline holds the full solution")
    if fmt == "single-file":
        from lorakit.single_file import save_single_file

        save_single_file(pipe, out, metadata={"lorakit.fusion": json.dumps({"method": args.method})})
        report["output"] = {"format": "single-file", "path": str(out)}
        write_json(report, out.with_name(out.stem + ".fusion.json"))
        return out
    report["output"] = {"format": "pipeline", "path": str(out)}
    save_pipeline(pipe, out, overwrite=args.overwrite, inputs=_input_paths(args),
                  extra=lambda tmp: write_json(report, tmp / "lorakit_fusion.json"))
    return out


def _input_paths(args) -> list[str]:
    return [*args.adapters, *([args.base] if args.base else []), *([args.hypernet] if getattr(args, "hypernet", None) else [])]


def check_output(args) -> None:
    """Refuse a bad --out before any work: an input, a folder or file lorakit did not write, an existing output
    without --overwrite, an unwritable place."""
    from lorakit.outputs import check_out_file, check_replace_dir

    if _out_format(args) in ("adapter", "single-file"):
        out = Path(args.out)
        if out.suffix != ".safetensors":
            raise ValueError(f"--out {out}: a {_out_format(args)} output must end in .safetensors")
        check_out_file(out, args.overwrite, inputs=_input_paths(args))
        check_out_file(out.with_name(out.stem + ".fusion.json"), args.overwrite, flag="--out (report)",
                       inputs=_input_paths(args))
    else:
        check_replace_dir(args.out, args.overwrite, inputs=_input_paths(args))
        from lorakit.outputs import check_writable

        check_writable(Path(args.out).parent)


def process_state():
    """accelerate's process state; without a GPU, launched processes form a gloo group only when told to use the
    CPU. Raises RuntimeError when launched as several processes that did not form one group (each would redo
    all the work and overwrite the same output)."""
    import os

    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and state.num_processes != world:
        raise RuntimeError(f"launched as {world} processes but accelerate formed a group of {state.num_processes}")
    return state


def memory_check(args) -> None:
    """Refuse (InsufficientMemory, exit 2) when the method's estimate exceeds the free memory."""
    import os

    import torch

    from lorakit.memory import default_device, estimate, preflight, worth_checking

    if not worth_checking(args.base):
        return

    stage = METHODS[args.method].memory_stage
    opts = from_args(METHODS[args.method].settings, args)
    size = getattr(opts, "resolution", None) if stage == "fuse-gradient" else getattr(opts, "ref_size", None)
    est = estimate(stage, args.base, resolution=size, n_loras=len(args.adapters), dtype=getattr(torch, args.dtype),
                   device=default_device(), cfg=(getattr(opts, "guidance", 1.0) or 1.0) > 1,
                   max_conv_dim=getattr(opts, "max_conv_dim", 4608) or 0,
                   adapter_bytes=sum(os.path.getsize(a) for a in args.adapters if os.path.isfile(a)))
    preflight(est, "--no-memory-check")


def run(args) -> int:
    t0 = time.perf_counter()
    method = METHODS[args.method]
    if method.needs_base and not args.base:
        raise ValueError(f"--method {args.method} needs --base")
    check_output(args)
    if args.base and method.memory_stage and not args.no_memory_check:
        memory_check(args)
    state = process_state()
    inputs = build_inputs(args)
    result = method.load()(inputs)
    report = {
        "written_by": "lorakit",
        "method": args.method,
        "base": args.base,
        "inputs": _inputs_report(inputs),
        "processes": state.num_processes,
        **result.report,
    }
    report["time_s"] = round(time.perf_counter() - t0, 3)
    out = None
    if state.is_main_process:
        out = write_outputs(args, inputs, result, report)
    state.wait_for_everyone()
    if state.is_main_process:
        summary = result.report.get("summary")
        print(f"lorakit fuse: {args.method} of {len(inputs.adapters)} adapters -> {out} ({report['time_s']:.1f} s)")
        if summary and summary.get("mean_residual") is not None:
            print(f"  layers {summary['layers']}, mean relative residual {summary['mean_residual']:.3g} "
                  f"(weighted average: {summary['mean_weighted_residual']:.3g}), max {summary['max_residual']:.3g}")
            if summary.get("mean_heldout_residual") is not None:
                print(f"  held-out: mean relative residual {summary['mean_heldout_residual']:.3g} (weighted average: "
                      f"{summary['mean_heldout_weighted_residual']:.3g}) on {summary['heldout_layers']} layers; "
                      f"capture {summary['capture_s']:.1f} s, solve {summary['solve_s']:.1f} s")
            if summary["fallback_layers"]:
                print(f"  weighted-average fallback on {len(summary['fallback_layers'])} layer(s): "
                      + ", ".join(summary["fallback_layers"][:5]))
    return 0
