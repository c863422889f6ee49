"""``lorakit sample``: generate images with several LoRAs (merge, switch, composite, cmlora, delta) and regional prompts."""

from __future__ import annotations

from lorakit.options import add_options, from_args, listing
from lorakit.sampling.methods import SAMPLERS, SamplerSettings


HELP = "generate images with several LoRAs: merge, LoRA Switch, LoRA Composite, CMLoRA, delta; regional prompts"
DESCRIPTION = (
    "Generate images from a base model with several LoRA/LoCon/ED-LoRA adapters. Each image is saved "
    "as PNG with a JSON sidecar (all settings, adapters with SHA-256, seed) so it can be regenerated. Under "
    "`accelerate launch` the images are split across processes; a seed gives the same image either way."
)


def add_arguments(p) -> None:
    p.description = DESCRIPTION + "\n\nmethods:\n" + listing(SAMPLERS)  # when the parser is built: the registry may grow
    p.add_argument("--base", required=True, help="base model: diffusers folder, .safetensors checkpoint, hub id, or tiny:sd1")
    p.add_argument("--adapters", nargs="*", default=[], metavar="FILE",
                   help="adapter .safetensors files (first = character for switch); none: plain sampling of --base "
                   "(e.g. a fused model)")
    p.add_argument("--weights", nargs="+", type=float, help="LoRA scale per adapter (default 1.0 each)")
    p.add_argument("--method", choices=list(SAMPLERS), default="merge", help="composition method (see above)")
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeat for several prompts)")
    p.add_argument("--negative-prompt", default="", help="negative prompt")
    p.add_argument("--regions", help="regions YAML: global prompt + boxes with their own prompts (replaces --prompt), "
                   "optional spatial conditions (T2I-Adapter / ControlNet); see docs/sampling.md")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--size", help="WIDTHxHEIGHT or one number (default: the base's native size)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=1, help="images per UNet batch")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 on CUDA, fp32 else")
    p.add_argument("--kinds", nargs="+", metavar="KIND",
                   help="concept category per adapter (character, clothing, style, background, object): cmlora's "
                   "official order and --masks attention (style: everywhere, background: around the others); default: each "
                   "file's lorakit.category metadata")
    p.add_argument("--cache", choices=["on", "off"],
                   help="cmlora: per-adapter deep-feature cache (default: on; official mode: on iff --cmlora-interval >= 2)")
    p.add_argument("--profile-prompt", default="a picture", help="cmlora: prompt of the profiling images")
    p.add_argument("--profile-steps", type=int, help="cmlora: steps of the profiling images (default --steps)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-memory-check", action="store_true",
                   help="start even when the memory estimate (lorakit.memory) exceeds the free RAM / VRAM")
    add_options(p.add_argument_group("sampler settings"), [("sample", SamplerSettings)])


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


def memory_check(args, sampler) -> None:
    """Refuse (InsufficientMemory, exit 2) when the sampling estimate exceeds the free memory."""
    import os

    import torch

    from lorakit.memory import default_device, estimate, preflight, worth_checking

    if not worth_checking(args.base):
        return

    device = default_device()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        args.dtype, torch.float16 if device == "cuda" else torch.float32)
    size = max(sampler.width or 0, sampler.height or 0) or None
    adapter_bytes = sum(os.path.getsize(a) for a in args.adapters if os.path.isfile(a))
    est = estimate("sample", args.base, resolution=size, batch=args.batch_size, n_loras=len(args.adapters),
                   dtype=dtype, device=device, cfg=sampler.cfg > 1, method=sampler.method, adapter_bytes=adapter_bytes)
    preflight(est, "--no-memory-check")


def run(args) -> int:
    from lorakit.sampling import SampleJob, run_sample

    width, height = parse_size(args.size)
    sampler = from_args(SamplerSettings, args, width=width, height=height,
                        cache=None if args.cache is None else args.cache == "on")
    if not args.no_memory_check:
        memory_check(args, sampler)
    if args.regions and args.prompt:
        raise ValueError("give either --prompt or --regions (its global prompt), not both")
    job = SampleJob(
        base=args.base, adapters=args.adapters, out_dir=args.out, prompts=args.prompt,
        negative_prompt=args.negative_prompt, weights=args.weights, kinds=args.kinds, seed=args.seed, num_images=args.num_images,
        batch_size=args.batch_size, regions=args.regions, dtype=args.dtype, sampler=sampler,
        profile_prompt=args.profile_prompt, profile_steps=args.profile_steps,
    )
    written = run_sample(job)
    print(f"wrote {len(written)} image(s) to {args.out}")
    return 0
