"""``lorakit sample``: generate images with several LoRAs (merge, switch, composite, cmlora) and regional prompts."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="generate images with several LoRAs: merge, LoRA Switch, LoRA Composite, CMLoRA; regional prompts",
        description="Generate images from a base model with several LoRA/LoCon/ED-LoRA adapters. Each image is saved "
        "as PNG with a JSON sidecar (all settings, adapters with SHA-256, seed) so it can be regenerated. Under "
        "`accelerate launch` the images are split across processes; a seed gives the same image either way.",
    )
    p.add_argument("--base", required=True, help="base model: diffusers folder, .safetensors checkpoint, hub id, or tiny:sd1")
    p.add_argument("--adapters", nargs="+", required=True, metavar="FILE", help="adapter .safetensors files (first = character for switch)")
    p.add_argument("--weights", nargs="+", type=float, help="LoRA scale per adapter (default 1.0 each)")
    p.add_argument("--method", choices=["merge", "switch", "composite", "cmlora"], default="merge")
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeat for several prompts)")
    p.add_argument("--negative-prompt", default="", help="negative prompt")
    p.add_argument("--regions", help="regions YAML: global prompt + boxes with their own prompts (replaces --prompt)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--size", help="WIDTHxHEIGHT or one number (default: the base's native size)")
    p.add_argument("--scheduler", help="ddim, ddpm, euler, euler_a, dpmpp_2m, dpmpp_2m_karras (default: the base's)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=1, help="images per UNet batch")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 on CUDA, fp32 else")
    p.add_argument("--switch-every", type=int, default=5, help="switch: steps per adapter (tau); cmlora: mean segment length")
    p.add_argument("--dominant-weight", type=float, default=0.55, help="cmlora: the dominant adapter's share of the weight")
    p.add_argument("--schedule-warp", type=float, default=0.75, help="cmlora: 0 uniform; towards 1 denser switching early/late")
    p.add_argument("--order", choices=["high-first", "low-first", "given"], default="high-first",
                   help="cmlora: dominance order from frequency profiles (given: the --adapters order, no profiling)")
    p.add_argument("--no-cache", action="store_true", help="cmlora: full UNet passes on the same schedule")
    p.add_argument("--cache-depth", type=int, default=1, help="cmlora: shallow path = first D down blocks + last D up blocks")
    p.add_argument("--cache-interval", type=int, default=5, help="cmlora: max age of a cached deep feature (steps)")
    p.add_argument("--profile-prompt", default="a picture", help="cmlora: prompt of the profiling images")
    p.add_argument("--profile-steps", type=int, help="cmlora: steps of the profiling images (default --steps)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """``"768x512"`` -> (width 768, height 512); ``"512"`` -> (512, 512); None -> (None, None)."""
    if not size:
        return None, None
    parts = size.lower().split("x")
    try:
        nums = [int(v) for v in parts]
    except ValueError:
        raise ValueError(f"--size {size!r}: expected WIDTHxHEIGHT or one number, e.g. 512x768") from None
    if len(nums) == 1:
        return nums[0], nums[0]
    if len(nums) == 2:
        return nums[0], nums[1]
    raise ValueError(f"--size {size!r}: expected WIDTHxHEIGHT or one number")


def run(args) -> int:
    from lorakit.sampling import SampleJob, SamplerSettings, run_sample

    width, height = parse_size(args.size)
    sampler = SamplerSettings(
        method=args.method, steps=args.steps, cfg=args.cfg, width=width, height=height, scheduler=args.scheduler,
        switch_every=args.switch_every, dominant_weight=args.dominant_weight, schedule_warp=args.schedule_warp,
        order=args.order, cache=not args.no_cache, cache_depth=args.cache_depth, cache_interval=args.cache_interval,
    )
    if args.regions and args.prompt:
        raise ValueError("give either --prompt or --regions (its global prompt), not both")
    job = SampleJob(
        base=args.base, adapters=args.adapters, out_dir=args.out, prompts=args.prompt,
        negative_prompt=args.negative_prompt, weights=args.weights, seed=args.seed, num_images=args.num_images,
        batch_size=args.batch_size, regions=args.regions, dtype=args.dtype, sampler=sampler,
        profile_prompt=args.profile_prompt, profile_steps=args.profile_steps,
    )
    written = run_sample(job)
    print(f"wrote {len(written)} image(s) to {args.out}")
    return 0
