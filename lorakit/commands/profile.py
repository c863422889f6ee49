"""``lorakit profile``: frequency profile of adapters (CMLoRA's high-frequency score), cached beside each file."""

from __future__ import annotations

import json


HELP = "score adapters by how much they amplify high frequencies (CMLoRA order), cached beside each file"
DESCRIPTION = (
    "Generate images with each adapter alone, take the 2-D FFT of the grayscale image, radially "
    "average the normalised log amplitude and score the mean over high radii. Prints the scores, the "
    "high/low grouping and the order CMLoRA uses; caches each profile in <file>.profile.json."
)


def add_arguments(p) -> None:
    p.add_argument("adapters", nargs="+", help="adapter .safetensors files")
    p.add_argument("--base", required=True, help="base model (diffusers folder, .safetensors, hub id, tiny:sd1)")
    p.add_argument("--prompt", default="a picture", help="prompt of the profiling images")
    p.add_argument("--negative-prompt", default="", help="negative prompt of the profiling images")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per profiling image")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one image per seed")
    p.add_argument("--size", help="WIDTHxHEIGHT or one number (default: the base's native size)")
    p.add_argument("--scheduler", help="scheduler name (default: the base's)")
    p.add_argument("--high-cutoff", type=float, default=0.5, help="high radii start at this fraction of the max radius")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 on CUDA, fp32 else")
    p.add_argument("--no-cache", action="store_true", help="recompute and do not write <file>.profile.json")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    from lorakit.commands.sample import parse_size
    from lorakit.sampling import ProfileSettings, run_profile

    width, height = parse_size(args.size)
    settings = ProfileSettings(
        base=args.base, prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, cfg=args.cfg,
        seeds=tuple(args.seeds), width=width, height=height, scheduler=args.scheduler, high_cutoff=args.high_cutoff,
    )
    result = run_profile(args.base, args.adapters, settings, dtype=args.dtype, use_cache=not args.no_cache)
    if args.json:
        print(json.dumps({p: {k: v for k, v in r.items() if k != "radial"} for p, r in result.items()}, indent=2, default=str))
        return 0
    print(f"{'rank':>4}  {'score':>8}  {'group':<5}  {'cached':<6}  file")
    for path, r in sorted(result.items(), key=lambda kv: kv[1]["rank"]):
        print(f"{r['rank']:>4}  {r['score']:8.5f}  {r['group']:<5}  {str(r['cached']):<6}  {path}")
    return 0
