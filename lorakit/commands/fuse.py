"""``lorakit fuse --method METHOD --adapters A B ... --out OUT``: fuse several adapters into one model or adapter.

The methods, their help and their options come from :mod:`lorakit.fusion.registry`; the fusion itself (inputs,
method, outputs) is :func:`lorakit.fusion.run.fuse`.
"""

from __future__ import annotations

from lorakit.fusion.registry import METHODS
from lorakit.options import add_options, from_args, listing


HELP = "fuse several LoRA/LoCon/ED-LoRA adapters: gradient fusion (Mix-of-Show) or weight merges"
DESCRIPTION = "Fuse several adapters into one model or one adapter file."
MULTI_GPU = ("Multi-GPU: accelerate launch -m lorakit.cli fuse ... splits the gradient method's activation capture "
             "between processes.")


def add_arguments(p) -> None:
    # the method listing is built with the parser: the registry may grow after import
    p.description = (DESCRIPTION + "\n\nmethods (dW_i = adapter i's delta, w_i = its --weights value):\n"
                     + listing(METHODS) + "\n\n" + MULTI_GPU)
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


def request(args):
    """The parsed flags as a :class:`lorakit.fusion.run.FuseRequest`."""
    from lorakit.fusion.run import FuseRequest

    return FuseRequest(
        method=args.method, adapters=list(args.adapters), out=args.out,
        settings=from_args(METHODS[args.method].settings, args), base=args.base, weights=args.weights,
        out_format=args.out_format, overwrite=args.overwrite, key_style=args.key_style, rank=args.rank,
        prompts=args.prompts, template=args.template, seed=args.seed, dtype=args.dtype,
        memory_check=not args.no_memory_check,
    )


def run(args) -> int:
    from lorakit.fusion.run import fuse

    done = fuse(request(args))
    if done.out is None:  # not the main process
        return 0
    report = done.report
    summary = report.get("summary")
    print(f"lorakit fuse: {args.method} of {done.adapters} adapters -> {done.out} ({report['time_s']:.1f} s)")
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
