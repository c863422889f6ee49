"""Seconds per image of merge, switch, composite and cmlora (cache on / off) at N = 2..5 adapters, in one process.

Prints one JSON line per (N, method): seconds per image, ratio to merge and to composite, and the number of full /
shallow UNet passes (each pass is one CFG batch). The goal of the cache: cmlora with cache <= 0.5x composite at N=4.

    python tools/bench_sample.py                 # "mid" random UNet (SD1 layout, SD-like cost per level), CPU
    python tools/bench_sample.py --unet tiny     # the test pipeline's tiny UNet

The "mid" UNet keeps SD1.5's shape (4 levels, channels x1 x2 x4 x4 as 320/640/1280/1280, cross-attention on the
first 3 levels) so that, as in SD, every level's convolutions cost about the same and the deep path (levels 1-3 +
mid) dominates. Times are CPU seconds of this process (``time.process_time``, 1 thread by default), which a busy
shared machine disturbs less than wall-clock seconds; both are printed, ratios use CPU seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time


def mid_pipeline(seed: int = 0):
    """tiny_pipeline('sd1') with an SD-shaped random UNet: channels (32, 64, 128, 128), latent 16x16."""
    import torch
    from diffusers import UNet2DConditionModel

    from lorakit.models import tiny_pipeline

    pipe = tiny_pipeline("sd1", seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128, 128), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    pipe.register_modules(unet=unet)
    return pipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", choices=["mid", "tiny"], default="mid")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ns", type=int, nargs="+", default=[2, 3, 4, 5])
    ap.add_argument("--cache-interval", type=int, default=5)
    ap.add_argument("--cache-depth", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared small CPU)")
    ap.add_argument("--repeats", type=int, default=1, help="images per measurement (seeds 0..r-1), best kept")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from lorakit.adapters.io import save_adapter
    from lorakit.models import tiny_pipeline
    from lorakit.sampling import SamplerSettings, generate, load_adapters
    from lorakit.sampling import _quiet_loading
    from lorakit.testing import random_adapter

    _quiet_loading()
    base = mid_pipeline() if args.unet == "mid" else tiny_pipeline("sd1")
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench_sample_{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    files = [
        str(save_adapter(random_adapter(base, seed=k, text_encoder=True, std=0.05), os.path.join(tmp, f"a{k}.safetensors")))
        for k in range(max(args.ns))
    ]
    pipe = copy.deepcopy(base)
    ads = load_adapters(pipe, files)
    methods = [
        ("merge", {}),
        ("switch", {}),
        ("composite", {}),
        ("cmlora_nocache", {"cache": False}),
        ("cmlora_cache", {"cache": True}),
    ]
    generate(pipe, ads[:2], SamplerSettings(method="composite", steps=2), "a red cat", "", [0])  # warm-up
    for n in args.ns:
        results = {}
        for label, extra in methods:
            method = "cmlora" if label.startswith("cmlora") else label
            st = SamplerSettings(method=method, steps=args.steps, cfg=7.5, order="given",
                                 cache_interval=args.cache_interval, cache_depth=args.cache_depth, **extra)
            best, info = None, {}
            for r in range(args.repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                _, info = generate(pipe, ads[:n], st, "a red cat", "", [r])
                dt = (time.process_time() - c0, time.perf_counter() - t0)
                best = dt if best is None else min(best, dt)
            passes = info.get("passes", {"full": args.steps, "shallow": 0})
            results[label] = (best[0], best[1], passes)
        for label, (sec, wall, passes) in results.items():
            print(json.dumps({
                "bench": "sample", "unet": args.unet, "n_adapters": n, "method": label, "steps": args.steps,
                "cpu_s_per_image": round(sec, 3), "wall_s_per_image": round(wall, 3),
                "ratio_to_merge": round(sec / results["merge"][0], 3),
                "ratio_to_composite": round(sec / results["composite"][0], 3),
                "full_passes": passes["full"], "shallow_passes": passes["shallow"],
                "cache_interval": args.cache_interval, "cache_depth": args.cache_depth, "threads": args.threads,
            }), flush=True)


if __name__ == "__main__":
    main()
