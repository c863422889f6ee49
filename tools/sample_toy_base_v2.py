"""Sample grid of a toy world v2 base (a pipeline folder, or the newest one a training ``--work`` folder holds).

Rows: per class prompt, the renderer's ground truth for seeds 0..k-1 (``target``) and the base's images for the
same prompt and seeds; a last pair of rows shows renders with identities and their VAE round trip. Writes a PNG
(``--scale`` x nearest-neighbour, default 2) and prints one JSON line (pipeline, step, VAE L1 error on the round-trip row).

    python tools/sample_toy_base_v2.py --base /work/shared_artifacts/toybase_v2/run --out grid.png --k 6
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch

# (prompt, scene) pairs: class prompts of every kind the base learns
PROMPTS = [
    ("red frog, white plain background", {"characters": ("frog",), "char_colors": ("red",)}),
    ("blue robot, night background", {"characters": ("robot",), "char_colors": ("blue",), "background": "night"}),
    ("yellow ghost, green hat, pink stripes background",
     {"characters": ("ghost",), "char_colors": ("yellow",), "hat": "hat", "hat_color": "green", "background": "stripes",
          "bg_color": "pink"}),
    ("purple mushroom, sand checker background",
     {"mushroom": "mushroom", "mushroom_color": "purple", "background": "checker", "bg_color": "sand"}),
    ("orange circle, cyan gradient background",
     {"shape": "circle", "shape_color": "orange", "background": "gradient", "bg_color": "cyan"}),
    ("green triangle, gray plain background, outline style",
     {"shape": "triangle", "shape_color": "green", "bg_color": "gray", "style": "outline"}),
]


def newest_pipeline(base: Path) -> tuple[Path, int | None]:
    """``base`` itself if it is a pipeline, else the newest ``toy-unet[-stepN]`` pipeline under ``base/unet``."""
    if (base / "model_index.json").exists():
        return base, None
    found = []
    for p in (base / "unet").glob("toy-unet*"):
        m = re.fullmatch(r"toy-unet(?:-step(\d+))?", p.name)
        if m and (p / "model_index.json").exists():
            found.append((p.stat().st_mtime, int(m.group(1)) if m.group(1) else None, p))
    if not found:
        raise SystemExit(f"error: no v2 pipeline in {base} (expected model_index.json or unet/toy-unet*)")
    _, step, path = max(found)
    return path, step


def measure_following(pipe, oracle, args) -> dict:
    """Prompt following on ``args.follow`` random class-world captions: per concept kind, k of n images where
    the oracle finds the captioned concept (Wilson 95% interval), and the rate with every concept found."""
    from lorakit.eval.stats import fmt_rate
    from lorakit.toyworld.v2.evaluate import found_by_kind
    from lorakit.toyworld.v2.render import caption
    from lorakit.toyworld.v2.scenes import class_scene

    rng = np.random.default_rng(2026)
    scenes = [class_scene(rng) for _ in range(args.follow)]
    hits: dict[str, list[bool]] = {}
    for i in range(0, len(scenes), 8):
        chunk = scenes[i : i + 8]
        g = [torch.Generator().manual_seed(i + j) for j in range(len(chunk))]
        images = pipe([caption(s) for s in chunk], num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=g, height=64, width=64).images
        for kind, found in found_by_kind(chunk, oracle.probabilities(images), oracle.concepts).items():
            hits.setdefault(kind, []).extend(found)
    every = hits.pop("all")
    out = {kind: fmt_rate(sum(v), len(v)) for kind, v in sorted(hits.items())}
    out["all_concepts"] = fmt_rate(sum(every), len(every))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--oracle", help="a v2 oracle folder: also count, per prompt, the images showing all its concepts")
    p.add_argument("--follow", type=int, default=0, metavar="N",
                   help="with --oracle: also N random class-world captions (seed 0..N-1), rates per concept kind")
    p.add_argument("--scale", type=int, default=2, help="nearest-neighbour enlargement of the saved grid")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from lorakit.toyworld.v2.render import Scene, render
    from lorakit.toyworld.v2.scenes import mixed_scene

    path, step = newest_pipeline(Path(args.base))
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    oracle = None
    if args.oracle:
        from lorakit.toyworld.v2.oracle import Oracle

        oracle = Oracle.load(args.oracle)
    rows, verdicts = [], {}
    for prompt, fields in PROMPTS:
        rows.append([render(Scene(**fields, seed=s)) for s in range(args.k)])
        g = [torch.Generator().manual_seed(s) for s in range(args.k)]
        rows.append(pipe([prompt] * args.k, num_inference_steps=args.steps, guidance_scale=args.guidance,
                         generator=g, height=64, width=64).images)
        if oracle is not None:
            wanted = sorted(Scene(**fields).concepts())
            sc = oracle.score(rows[-1], wanted)
            verdicts[prompt] = {"concepts": wanted, "all_present": int(sc.present.all(dim=1).sum()),
                                "present": {c: int(sc.present[:, i].sum()) for i, c in enumerate(wanted)},
                                "n": args.k}
    follow = measure_following(pipe, oracle, args) if oracle is not None and args.follow else None
    rng = np.random.default_rng(123)
    real = [render(mixed_scene(rng)) for _ in range(args.k)]
    x = torch.from_numpy(np.stack([np.asarray(r) for r in real])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    l1 = float((rec - x).abs().mean() * 127.5)
    rows += [real, [Image.fromarray(((r.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for r in rec]]
    grid = Image.new("RGB", (64 * args.k, 64 * len(rows)), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im, (64 * j, 64 * i))
    grid = grid.resize((grid.width * args.scale, grid.height * args.scale), Image.NEAREST)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out, optimize=True)
    print(json.dumps({"pipeline": str(path), "step": step, "prompts": [q for q, _ in PROMPTS],
                      "vae_l1_per_channel_0_255": round(l1, 2), "out": args.out, "oracle": verdicts or None,
                      "following": follow}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
