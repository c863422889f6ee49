"""A picture of one v2 identity LoRA against its goals: the first ``--n`` prompts of its measurement, one column each.

Rows: the renderer's image of the scene, that image through the base's VAE (what a perfect LoRA could give), the
base with the trigger prompt, the LoRA with the trigger prompt, and the LoRA with the class prompt (the class-leak
row). The images are those ``tools/measure_toyworld.py --world v2`` scores (the same prompts, the same per-image
seeds, 20 DDIM steps, guidance 4, LoRA scale 0.8); each generated image carries the oracle's verdict on the
identity (a green bar: found; red: not), enlarged with nearest-neighbour scaling.

    python tools/plot_identity_grid.py pixlor artifacts/toy2_loras/toy2_pixlor-<hash>.safetensors --out grid.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("identity", help="a v2 identity (pixlor, inkvel, kwibbit, ...)")
    p.add_argument("lora", help="the identity's LoRA (.safetensors)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--n", type=int, default=8, help="columns: the measurement's first N prompts")
    p.add_argument("--scale", type=float, default=0.8)
    p.add_argument("--zoom", type=int, default=3)
    p.add_argument("--base", default="data/toy2-base")
    p.add_argument("--oracle", help="the v2 oracle folder (default: data/toy2-oracle)")
    return p.parse_args(argv)


def with_verdict(img: Image.Image, found: bool) -> np.ndarray:
    """``img`` with a 3-pixel bar below it: green if the oracle found the identity, red if not."""
    a = np.asarray(img.convert("RGB"))
    bar = np.broadcast_to(np.array((40, 170, 60) if found else (200, 40, 40), np.uint8), (3, a.shape[1], 3))
    return np.concatenate([a, bar])


def main(argv=None) -> int:
    import torch

    from lorakit.fileio import save_image
    from lorakit.toyworld.v2.evaluate import identity_prompts, identity_scene_pairs
    from lorakit.toyworld.v2.loras import identity_name
    from lorakit.toyworld.v2.measure import IDENTITY_PROMPT_SEED, images, load_pipeline, vae_round_trip
    from lorakit.toyworld.v2.oracle import Oracle
    from lorakit.toyworld.v2.render import render

    args = parse_args(argv)
    identity = identity_name(args.identity)
    if not Path(args.lora).is_file():
        raise FileNotFoundError(f"{args.lora}: no such LoRA file")
    torch.set_num_threads(1)
    oracle = Oracle.load(args.oracle)
    triples = identity_prompts(identity, args.n, seed=IDENTITY_PROMPT_SEED)
    scenes = [s for s, _ in identity_scene_pairs(identity, args.n, seed=IDENTITY_PROMPT_SEED)]
    base, lora = load_pipeline(args.base), load_pipeline(args.base)
    lora.load_lora_weights(args.lora, adapter_name=identity)
    lora.set_adapters([identity], [args.scale])
    rendered = [render(s) for s in scenes]
    rows = [rendered, vae_round_trip(base.vae, rendered), images(base, [t for t, _, _ in triples]),
            images(lora, [t for t, _, _ in triples]), images(lora, [c for _, c, _ in triples])]
    names = ("render", "render through the VAE", "base, trigger prompt", "LoRA, trigger prompt", "LoRA, class prompt")
    grid = []
    for name, row in zip(names, rows):
        found = oracle.score(row, [identity]).present[:, 0].tolist()
        grid.append(np.concatenate([np.pad(with_verdict(im, f), ((0, 2), (0, 2), (0, 0)), constant_values=255)
                                    for im, f in zip(row, found)], 1))
        print(f"{name}: {sum(found)}/{len(row)} {identity}")
    out = Image.fromarray(np.concatenate(grid))
    out = out.resize((out.width * args.zoom, out.height * args.zoom), Image.NEAREST)
    save_image(out, args.out)
    return 0


if __name__ == "__main__":
    from lorakit.errors import run_guarded

    raise SystemExit(run_guarded(main, "plot_identity_grid"))
