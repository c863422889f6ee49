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
    Arg(("--ridge",), dict(type=float, default=1e-6, help="gradient: ridge toward W0 relative to trace(G)/in "
                                                           "(default 1e-6; 1e-4 makes the solution less sensitive to float noise in weakly covered input directions)")),
    Arg(("--max-conv-dim",), dict(type=int, default=4608, help="gradient: solve a conv on unfolded patches when "
                                  "in*kh*kw <= this (Gram memory 8*dim^2 bytes); larger convs use the weighted "
                                  "average and are listed in the report (default 4608; 0 = never solve convs)")),
    Arg(("--ridge-target",), dict(choices=["base", "average"], default="base",
                                  help="gradient: the ridge pulls toward W0 (base, default: unseen input directions "
                                       "keep the base weights) or toward the weighted average")),
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
        "(+ small ridge to W0) from each concept's recorded activations; writes a fused pipeline folder "
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
    p.add_argument("--out-format", choices=["auto", "pipeline", "adapter"], default="auto",
                   help="pipeline: diffusers folder with the fused weights + lorakit_fusion.json; adapter: a "
                        "fused-delta .safetensors (W_fused - W0) + OUT.fusion.json; auto: pipeline for gradient, "
                        "adapter for the weight merges")
    p.add_argument("--rank", type=int, help="truncate the written delta to this rank by SVD (default: exact)")
    p.add_argument("--prompts", nargs="+", metavar="PROMPTS",
                   help="one entry per adapter, several prompts separated by '|' (default: each file's trigger "
                        "metadata as 'photo of a {trigger}' and '{trigger}', else generic prompts with a warning)")
    p.add_argument("--template", default="photo of a {}", help="prompt template for trigger words")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling (gradient) and random drops (dare)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype the base is loaded and saved in (statistics and solves are float64)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
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
    from lorakit.fusion import FuseInputs, concept_prompts

    paths = list(args.adapters)
    if args.weights is not None and len(args.weights) != len(paths):
        raise ValueError(f"--weights has {len(args.weights)} values for {len(paths)} adapters; give one per adapter")
    if args.prompts is not None and len(args.prompts) != len(paths):
        raise ValueError(f"--prompts has {len(args.prompts)} entries for {len(paths)} adapters; give one per adapter "
                         "(several prompts for one adapter are separated by '|')")
    adapters = [load_adapter(p) for p in paths]
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
    )


def _inputs_report(inputs) -> list[dict]:
    return [
        {"path": p, "name": n, "weight": w, "kind": a.kind, "rank": max((m.rank for m in a.modules.values()), default=0),
         "modules": len(a.modules), "prompts": pr, "sample_prompts": sp, "prompt_source": src}
        for p, n, w, a, pr, sp, src in zip(inputs.paths, inputs.names, inputs.weights, inputs.adapters, inputs.prompts,
                                           inputs.sample_prompts, inputs.prompt_sources)
    ]


def write_outputs(args, inputs, result, report: dict) -> Path:
    """Write the adapter file or the pipeline folder, plus the JSON report. Returns the output path."""
    from lorakit.adapters.io import Adapter, adapter_metadata, save_adapter
    from lorakit.fileio import write_json
    from lorakit.fusion.merge import _maybe_truncate, apply_deltas
    from lorakit.models import save_pipeline

    out = Path(args.out)
    fmt = _out_format(args)
    if fmt == "adapter":
        if result.modules is None:
            raise ValueError(f"--method {args.method} produces no adapter delta; use --out-format pipeline")
        if out.suffix != ".safetensors":
            raise ValueError(f"--out {out}: an adapter output must end in .safetensors")
        modules = _maybe_truncate(result.modules, args.rank)
        arch = next((a.arch for a in inputs.adapters if a.arch), None) or "sd1"
        triggers = [a.metadata["lorakit.trigger"] for a in inputs.adapters if a.metadata.get("lorakit.trigger")]
        meta = adapter_metadata(arch, "fused-delta", trigger=", ".join(triggers) or None,
                                rank=max(m.rank for m in modules.values()), alpha=None)
        meta["lorakit.fusion"] = json.dumps({"method": args.method, "inputs": [Path(p).name for p in inputs.paths],
                                             "weights": inputs.weights, "rank": args.rank})
        meta.update(result.metadata)
        save_adapter(Adapter(modules=modules, metadata=meta, extra=dict(result.extra)), out)
        report["output"] = {"format": "adapter", "path": str(out), "modules": len(modules),
                            "ranks": sorted({m.rank for m in modules.values()})}
        write_json(report, out.with_name(out.stem + ".fusion.json"))
        return out
    pipe = result.pipeline
    if pipe is None:
        pipe = inputs.load_pipe()
        if pipe is None:
            raise ValueError(f"--out-format pipeline needs --base (the model to add the {args.method} delta to)")
        apply_deltas(pipe, _maybe_truncate(result.modules, args.rank))
    elif args.rank is not None:
        raise ValueError("--rank applies to --out-format adapter; a fused pipeline holds the full solution")
    save_pipeline(pipe, out)
    report["output"] = {"format": "pipeline", "path": str(out)}
    write_json(report, out / "lorakit_fusion.json")
    return out


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


_MEMORY_STAGES = {"gradient": "fuse-gradient", "ziplora": "ziplora", "lorarar": "ziplora"}


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
    if args.base and args.method in _MEMORY_STAGES and not args.no_memory_check:
        memory_check(args)
    state = process_state()
    inputs = build_inputs(args)
    fn = getattr(importlib.import_module(method.module), method.function)
    result = fn(inputs)
    report = {
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
            if summary["fallback_layers"]:
                print(f"  weighted-average fallback on {len(summary['fallback_layers'])} layer(s): "
                      + ", ".join(summary["fallback_layers"][:5]))
    return 0
