"""``lorakit make-tiny``: save a random-weight SD1/SD2/SDXL pipeline that diffusers loads (tests, demos, benches).

``--size tiny`` (default, ~1 s) for tests; ``--size mid`` (SD's channel ratios at 1/10 width); ``--size full``
(the released models' sizes: SD 1.5 / SD 2.x / SDXL UNet, VAE and text encoders); ``--config DIR`` takes a
folder of diffusers/transformers ``config.json`` files (``unet/``, ``vae/``, ``text_encoder/``[, ``text_encoder_2/``]).
Nothing is downloaded; weights are random.
"""

from __future__ import annotations


HELP = "save a random-weight SD1/SD2/SDXL pipeline: tiny, mid or full size (offline)"
DESCRIPTION = (
    "Save a random-weight pipeline with the real architecture's module names and blocks, at tiny, "
    "mid or the released models' full size, or from a folder of configs. Load it with diffusers' "
    "StableDiffusionPipeline / StableDiffusionXLPipeline.from_pretrained(OUT)."
)


def add_arguments(p) -> None:
    p.add_argument("--arch", choices=["sd1", "sd2", "sdxl"], default="sd1", help="architecture (default: sd1)")
    p.add_argument("--size", choices=["tiny", "mid", "full"], default="tiny",
                   help="tiny (tests, ~1 s), mid, or full (SD 1.5: 1.07B parameters, 4.3 GB fp32; SDXL: 3.5B)")
    p.add_argument("--config", help="folder with unet/ vae/ text_encoder/ [text_encoder_2/] config.json files "
                                    "(overrides --arch/--size)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="weight dtype, also while building (default fp32)")
    p.add_argument("--out", required=True, help="output folder (new or empty; see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a folder lorakit wrote (never any other folder), atomically")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")


def run(args) -> int:
    import torch

    from lorakit.models import pipeline_arch, pipeline_from_configs, save_pipeline, sized_pipeline
    from lorakit.outputs import check_replace_dir

    check_replace_dir(args.out, args.overwrite)  # before building anything
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.config:
        pipe = pipeline_from_configs(args.config, seed=args.seed, dtype=dtype)
        what = f"{pipeline_arch(pipe)} pipeline from {args.config}"
    else:
        pipe = sized_pipeline(args.arch, args.size, seed=args.seed, dtype=dtype)
        what = f"{args.size} {args.arch} pipeline"
    n = sum(p.numel() for c in ("unet", "vae", "text_encoder", "text_encoder_2")
            if getattr(pipe, c, None) is not None for p in getattr(pipe, c).parameters())
    out = save_pipeline(pipe, args.out, overwrite=args.overwrite)
    print(f"wrote {what} ({n / 1e6:,.1f}M parameters, {args.dtype}) to {out}")
    return 0
