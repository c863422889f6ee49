"""Seconds per image of the composition methods at N adapters, in one process, on the same adapters and seeds.

Prints one JSON line per (N, method): seconds per image, ratio to merge and to composite, and the number of full /
shallow UNet passes. The goal of CMLoRA's cache: cmlora (default settings) <= 0.5x composite at N = 4.

    python tools/bench_sample.py                          # "mid" random UNet (SD1 layout, SD-like cost per level)
    python tools/bench_sample.py --unet tiny              # the test pipeline's tiny UNet
    python tools/bench_sample.py --split-costs --repeats 3  # shallow / full pass cost per cache split layer
    flock /work/heavy.lock python tools/bench_sample.py --unet sd15 --latent 16 --ns 4 --methods composite cmlora
                                                          # SD 1.5's UNet config, random weights (~3.4 GB fp32)

The "mid" UNet keeps SD1.5's shape (4 levels, channels x1 x2 x4 x4 as 320/640/1280/1280, cross-attention on the
first 3 levels) so that, as in SD, every level's convolutions cost about the same and the deep path (levels 1-3 +
mid) dominates. "sd15" is ``UNet2DConditionModel`` with SD 1.5's config (cross-attention 768) and random
weights, with a tiny 768-wide text encoder; ``--latent 16`` is SD's 128 px. Times are wall seconds and CPU seconds
of this process (``time.process_time``, 1 thread by default); ratios use CPU seconds, which a busy shared machine
disturbs less. Methods: merge, switch, composite, cmlora (lorakit defaults), cmlora_nocache, cmlora_official,
cmlora_layer0 / cmlora_layer2 (lorakit mode, cache split before layer 0 / 2 of the last up block), composite_ubase,
delta, merge_ubase.
"""

from __future__ import annotations

import argparse
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


def sd15_pipeline(latent: int, seed: int = 0):
    """tiny_pipeline('sd1') with SD 1.5's UNet config (random weights) and a 768-wide tiny text encoder."""
    import torch
    from diffusers import UNet2DConditionModel

    from lorakit.models import _tiny_text_encoder, tiny_pipeline

    pipe = tiny_pipeline("sd1", seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=latent, cross_attention_dim=768, attention_head_dim=8)
    te = _tiny_text_encoder(len(pipe.tokenizer), 768, 2, with_projection=False)
    pipe.register_modules(unet=unet, text_encoder=te)
    return pipe


METHODS = {
    "merge": {"method": "merge"},
    "switch": {"method": "switch"},
    "composite": {"method": "composite"},
    "cmlora": {"method": "cmlora"},
    "cmlora_nocache": {"method": "cmlora", "cache": False},
    "cmlora_official": {"method": "cmlora", "cmlora_mode": "official"},
    "cmlora_layer0": {"method": "cmlora", "cache_layer": 0},
    "cmlora_layer2": {"method": "cmlora", "cache_layer": 2},
    "composite_ubase": {"method": "composite", "uncond": "base"},
    "delta": {"method": "delta"},
    "merge_ubase": {"method": "merge", "uncond": "base"},
}


def split_costs(pipe, ads, args) -> None:
    """One JSON line per cache split (depth ``--cache-depth``, every layer of that up block): the CPU seconds of a
    shallow pass over those of a full pass (batch 2, one LoRA active, best of ``--repeats``)."""
    import torch

    from lorakit.sampling.cache import unet_split_forward
    from lorakit.sampling.composer import UNetAdapterSwitch

    unet = pipe.unet
    UNetAdapterSwitch(unet).activate([ads[0].name], [ads[0].weight])
    size = unet.config.sample_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, size, size, generator=gen)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    t = torch.tensor(500)

    def best(fn):
        fn()  # warm-up
        times = []
        for _ in range(max(1, args.repeats)):
            c0 = time.process_time()
            fn()
            times.append(time.process_time() - c0)
        return min(times)

    with torch.no_grad():
        full = best(lambda: unet(x, t, encoder_hidden_states=text, return_dict=False))
        n_layers = len(unet.up_blocks[len(unet.up_blocks) - args.cache_depth].resnets)
        for layer in range(n_layers):
            _, deep = unet_split_forward(unet, x, t, text, args.cache_depth, layer=layer)
            shallow = best(lambda: unet_split_forward(unet, x, t, text, args.cache_depth, deep_feature=deep, layer=layer))
            print(json.dumps({"bench": "split_cost", "unet": args.unet, "latent": size, "cache_depth": args.cache_depth,
                              "cache_layer": layer, "full_cpu_s": round(full, 4), "shallow_cpu_s": round(shallow, 4),
                              "shallow_over_full": round(shallow / full, 3), "threads": args.threads}), flush=True)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", choices=["mid", "tiny", "sd15"], default="mid")
    ap.add_argument("--latent", type=int, default=16, help="sd15: latent size (16 = 128 px on SD's VAE)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ns", type=int, nargs="+", default=[2, 3, 4, 5])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--cmlora-interval", type=int, default=0)
    ap.add_argument("--cache-refresh", default="round", choices=["dominant", "round", "age"])
    ap.add_argument("--cache-depth", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared small CPU)")
    ap.add_argument("--split-costs", action="store_true",
                    help="instead: a shallow pass's cost over a full pass's, per cache split layer")
    ap.add_argument("--repeats", type=int, default=1, help="images per measurement (seeds 0..r-1, methods interleaved), best kept")
    return ap


def main() -> None:
    args = _parser().parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from lorakit.adapters.io import save_adapter
    from lorakit.models import tiny_pipeline
    from lorakit.logs import quiet_loaded_libraries
    from lorakit.sampling import SamplerSettings, generate, load_adapters
    from lorakit.testing import random_adapter

    quiet_loaded_libraries()
    pipe = {"mid": mid_pipeline, "tiny": lambda: tiny_pipeline("sd1"), "sd15": lambda: sd15_pipeline(args.latent)}[args.unet]()
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench_sample_{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    files = [
        str(save_adapter(random_adapter(pipe, seed=k, text_encoder=True, std=0.05), os.path.join(tmp, f"a{k}.safetensors")))
        for k in range(max(args.ns))
    ]
    ads = load_adapters(pipe, files)
    common = {"steps": args.steps, "cfg": 7.5, "width": size, "height": size, "cmlora_order": "given",
              "cmlora_interval": args.cmlora_interval, "cache_refresh": args.cache_refresh,
              "cache_depth": args.cache_depth}
    if args.split_costs:
        split_costs(pipe, ads, args)
        return
    generate(pipe, ads[:2], SamplerSettings(**{**common, "method": "composite", "steps": 2}), "a red cat", "", [0],
             output_type="latent")  # warm-up
    for n in args.ns:
        results = {}
        for r in range(args.repeats):  # methods interleaved, so a change of the machine's load hits them alike
            for label in args.methods:
                st = SamplerSettings(**{**common, **METHODS[label]})
                t0, c0 = time.perf_counter(), time.process_time()
                _, info = generate(pipe, ads[:n], st, "a red cat", "", [r], output_type="latent")
                dt = (time.process_time() - c0, time.perf_counter() - t0)
                old = results.get(label)
                results[label] = (min(dt[0], old[0]), min(dt[1], old[1]), info) if old else (*dt, info)
        for label, (sec, wall, info) in results.items():
            passes = info["passes"]
            ratio = lambda ref: round(sec / results[ref][0], 3) if ref in results else None  # noqa: E731
            print(json.dumps({
                "bench": "sample", "unet": args.unet, "latent": pipe.unet.config.sample_size, "n_adapters": n,
                "method": label, "steps": args.steps, "cpu_s_per_image": round(sec, 3),
                "wall_s_per_image": round(wall, 3), "ratio_to_merge": ratio("merge"),
                "ratio_to_composite": ratio("composite"), "full_passes": passes["full"],
                "shallow_passes": passes["shallow"], "cmlora_interval": args.cmlora_interval,
                "cache_refresh": args.cache_refresh, "cache_depth": args.cache_depth,
                "cache_split": info.get("cache_split"), "threads": args.threads,
            }), flush=True)


if __name__ == "__main__":
    main()
