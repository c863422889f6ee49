"""``lorakit make-tiny``: save a random tiny SD1/SDXL pipeline that diffusers loads (for tests and demos)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "make-tiny",
        help="save a tiny random-weight SD1/SDXL pipeline (offline, ~1 s)",
        description="Save a tiny random-weight pipeline with the real architecture's module names and blocks. "
        "Load it with diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline.from_pretrained(OUT).",
    )
    p.add_argument("--arch", choices=["sd1", "sd2", "sdxl"], default="sd1", help="architecture (default: sd1)")
    p.add_argument("--out", required=True, help="output folder (new or empty; see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a folder lorakit wrote (never any other folder), atomically")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    from lorakit.models import save_pipeline, tiny_pipeline
    from lorakit.outputs import check_replace_dir

    check_replace_dir(args.out, args.overwrite)  # before building anything
    out = save_pipeline(tiny_pipeline(args.arch, seed=args.seed), args.out, overwrite=args.overwrite)
    print(f"wrote tiny {args.arch} pipeline to {out}")
    return 0
