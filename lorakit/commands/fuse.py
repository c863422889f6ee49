"""``lorakit fuse --method METHOD --adapters A B ... --out OUT``: fuse several adapters into one model or adapter.

Adding a method is one entry in ``METHODS``: ``name: Method(module, function, help, ...)`` where
``module.function(inputs: lorakit.fusion.FuseInputs) -> lorakit.fusion.FuseResult``; method-specific options
go in its ``args`` (flags shared by several methods are declared once, the first declaration's help wins).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path


def _ridge(value: str):
    """``--ridge``: ``auto`` or a number >= 0."""
    import argparse

    if value == "auto":
        return value
    try:
        out = float(value)
    except ValueError:
        out = -1.0
    if not out >= 0 or out == float("inf"):
        raise argparse.ArgumentTypeError(f"expected auto or a finite number >= 0, got {value!r}")
    return out


@dataclass(frozen=True)
class Arg:
    """An argparse option a method needs: ``Arg(("--steps",), dict(type=int, help=...))``."""

    flags: tuple
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """One fusion method: where its ``run`` lives, what it computes, what it needs."""

    module: str
    function: str
    help: str
    needs_base: bool = False
    default_format: str = "adapter"  # what --out-format auto writes
    args: tuple = ()


_GRADIENT_ARGS = (
    Arg(("--steps",), dict(type=int, default=None, help="gradient: sampling steps recorded per prompt (default 20, "
                                                         "the reference's)")),
    Arg(("--resolution",), dict(type=int, default=None, help="gradient: sampling size in pixels (default: the "
                                                              "pipeline's, 512 SD1 / 1024 SDXL)")),
    Arg(("--samples",), dict(type=int, default=1, help="gradient: samples (seeds) per sampling prompt (default 1)")),
    Arg(("--guidance",), dict(type=float, default=1.0, help="gradient: CFG scale while recording (default 1 = no "
                                                             "CFG, as the reference)")),
    Arg(("--ridge",), dict(type=_ridge, default="auto", help="gradient: ridge toward --ridge-target, relative to trace(G)/in, or "
                                                              "auto (default): per layer, the value of a grid with "
                                                              "the lowest objective on held-out activations")),
    Arg(("--val-prompts",), dict(nargs="+", metavar="PROMPTS", help="gradient: held-out prompts per adapter ('|'-"
                                 "separated) for --ridge auto (default: 'a picture of {trigger}' and '{trigger}, "
                                 "high quality' for trigger prompts, else none: other seeds only)")),
    Arg(("--val-samples",), dict(type=int, default=1, help="gradient: held-out seeds per sampling prompt (default 1)")),
    Arg(("--kv-rows",), dict(choices=["all", "concept", "prompt"], default="all",
                             help="gradient: token rows of the to_k/to_v stage: the padded sequence the UNet reads "
                                  "(all, default), the concept's tokens + the end token (concept, the reference's), "
                                  "or every prompt token")),
    Arg(("--capture-batch",), dict(type=int, default=8, help="gradient: prompts x seeds per forward pass while "
                                                              "recording (default 8)")),
    Arg(("--max-conv-dim",), dict(type=int, default=4608, help="gradient: solve a conv on unfolded patches when "
                                  "in*kh*kw <= this (Gram memory 8*dim^2 bytes); larger convs use the weighted "
                                  "average and are listed in the report (default 4608; 0 = never solve convs)")),
    Arg(("--ridge-target",), dict(choices=["base", "average"], default="average",
                                  help="gradient: the ridge pulls toward the weighted average (average, default: "
                                       "unseen input directions keep the average) or toward W0 (base)")),
    Arg(("--unet-inputs",), dict(choices=["fused_text", "own"], default="fused_text",
                                 help="gradient: sample the UNet stage with the fused text encoder and to_k/to_v "
                                      "(fused_text, the reference) or with each concept's own ones")),
    Arg(("--scheduler",), dict(default=None, help="gradient: sampler while recording (ddim, ddpm, euler, euler_a, "
                                                   "dpmpp_2m, dpmpp_2m_karras; default: the pipeline's)")),
)
_MERGE_ARGS = (
    Arg(("--combine",), dict(choices=["average", "sum"], default=None,
                             help="weighted/svd: average (divide by N; weighted's default) or sum (svd's default)")),
    Arg(("--density",), dict(type=float, default=0.5, help="ties/dare: fraction of each delta's entries kept "
                                                           "(default 0.5)")),
    Arg(("--majority-sign",), dict(choices=["total", "frequency"], default="total",
                                   help="ties/dare-ties: sign election by summed magnitude or by count")),
    Arg(("--dare-variant",), dict(choices=["linear", "ties"], default="linear",
                                  help="dare: peft dare_linear (weighted sum) or dare_ties (sign election + mean)")),
)

_PAIR_ARGS = (  # ziplora / lorarar (lorakit.fusion.ziplora, lorakit.fusion.lorarar)
    Arg(("--hypernet",), dict(help="lorarar: the trained hypernetwork .safetensors (train_lorarar.py)")),
    Arg(("--layers",), dict(nargs="+", metavar="PATTERN", help="ziplora/lorarar: UNet layers that get per-column "
                                                                "coefficients, e.g. to_q to_out.0 (default: ziplora "
                                                                "every shared layer, lorarar the hypernetwork's)")),
    Arg(("--lr",), dict(type=float, default=0.01, help="ziplora: Adam learning rate of the coefficients (0.01)")),
    Arg(("--lam",), dict(type=float, default=0.01, help="ziplora: weight of the |cos| term (0.01)")),
    Arg(("--ref-images",), dict(nargs=2, metavar="DIR", help="ziplora: reference image folders of CONTENT and "
                                                             "STYLE (default: the files' metadata, else generated)")),
    Arg(("--ref-num",), dict(type=int, default=4, help="ziplora: reference images per LoRA (4)")),
    Arg(("--ref-size",), dict(type=int, default=None, help="ziplora: reference image size in pixels (default: base's)")),
    Arg(("--ref-steps",), dict(type=int, default=20, help="ziplora: sampling steps for generated references (20)")),
)

# name -> Method. Order = the order --help lists them.
METHODS: dict[str, Method] = {
    "gradient": Method(
        "lorakit.fusion.gradient", "run",
        "Mix-of-Show gradient fusion, closed form: per layer W* = argmin sum_i ||W X_i - (W0 + w_i dW_i) X_i||^2 "
        "(+ a ridge toward the weighted average, chosen per layer on held-out activations) from each concept's "
        "recorded activations; writes a fused pipeline folder "
        "(or, with --out-format adapter, the delta W* - W0)",
        needs_base=True, default_format="pipeline", args=_GRADIENT_ARGS,
    ),
    "weighted": Method("lorakit.fusion.merge", "run", "W0 + (1/N) sum_i w_i dW_i (average, Mix-of-Show's weight "
                       "fusion); --combine sum drops the 1/N; exact (rank = sum of ranks)", args=_MERGE_ARGS),
    "cat": Method("lorakit.fusion.merge", "run", "sum_i w_i dW_i exactly: factors stacked, rank = sum of ranks "
                  "(peft's cat)", args=_MERGE_ARGS),
    "svd": Method("lorakit.fusion.merge", "run", "sum_i w_i dW_i (or the average with --combine average) "
                  "truncated by SVD to --rank (default: the largest input rank)", args=_MERGE_ARGS),
    "ties": Method("lorakit.fusion.merge", "run", "TIES (peft merge_utils.ties): keep the top --density of each "
                   "w_i-weighted delta, elect a sign per entry, average the agreeing entries; SVD to --rank",
                   args=_MERGE_ARGS),
    "dare": Method("lorakit.fusion.merge", "run", "DARE (peft dare_linear / dare_ties): drop entries at random "
                   "keeping --density, rescale by 1/density, weighted sum (or TIES merge); SVD to --rank",
                   args=_MERGE_ARGS),
    "ziplora": Method("lorakit.fusion.ziplora", "run_fuse", "ZipLoRA: --adapters CONTENT STYLE; per-column "
                      "coefficients m_c, m_s (init 1) optimised --steps (default 100) on the base so the merge "
                      "reproduces each LoRA on its reference images; exact rank r_c + r_s LoRA", needs_base=True,
                      args=_PAIR_ARGS),
    "lorarar": Method("lorakit.fusion.lorarar", "run_fuse", "LoRA.rar: --adapters CONTENT STYLE merged in one "
                      "forward pass of a trained --hypernet (train_lorarar.py); exact rank r_c + r_s LoRA",
                      args=_PAIR_ARGS),
}


def add_parser(sub) -> None:
    methods_help = "\n".join(f"  {name:<9} {m.help}" for name, m in METHODS.items())
    import argparse

    p = sub.add_parser(
        "fuse",
        help="fuse several LoRA/LoCon/ED-LoRA adapters: gradient fusion (Mix-of-Show) or weight merges",
        description="Fuse several adapters into one model or one adapter file.\n\nmethods (dW_i = adapter i's "
        "delta, w_i = its --weights value):\n" + methods_help + "\n\nMulti-GPU: accelerate launch -m lorakit.cli "
        "fuse ... splits the gradient method's activation capture between processes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    group = p.add_argument_group("method options")
    seen = set()
    for m in METHODS.values():
        for arg in m.args:
            if arg.flags[0] not in seen:
                seen.add(arg.flags[0])
                group.add_argument(*arg.flags, **arg.kwargs)
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
        prompts=prompts, sample_prompts=samples, rank=args.rank, seed=args.seed, load_pipe=load_pipe, args=args,
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


# lorarar is left out: one hypernetwork pass over the pair, no base model (measured at SD 1.5 size: ~1.1 GiB).
_MEMORY_STAGES = {"gradient": "fuse-gradient", "ziplora": "ziplora"}


def memory_check(args) -> None:
    """Refuse (InsufficientMemory, exit 2) when the method's estimate exceeds the free memory."""
    import os

    import torch

    from lorakit.memory import default_device, estimate, preflight, worth_checking

    if not worth_checking(args.base):
        return

    stage = _MEMORY_STAGES[args.method]
    size = getattr(args, "resolution", None) if stage == "fuse-gradient" else getattr(args, "ref_size", None)
    est = estimate(stage, args.base, resolution=size, n_loras=len(args.adapters), dtype=getattr(torch, args.dtype),
                   device=default_device(), cfg=(getattr(args, "guidance", 1.0) or 1.0) > 1,
                   max_conv_dim=getattr(args, "max_conv_dim", 4608) or 0,
                   adapter_bytes=sum(os.path.getsize(a) for a in args.adapters if os.path.isfile(a)))
    preflight(est, "--no-memory-check")


def run(args) -> int:
    import importlib

    t0 = time.perf_counter()
    method = METHODS[args.method]
    if method.needs_base and not args.base:
        raise ValueError(f"--method {args.method} needs --base")
    check_output(args)
    if args.base and args.method in _MEMORY_STAGES and not args.no_memory_check:
        memory_check(args)
    state = process_state()
    inputs = build_inputs(args)
    fn = getattr(importlib.import_module(method.module), method.function)
    result = fn(inputs)
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
