"""Does regional sampling follow a sketch better with the toy sketch adapter than without? (toy world, CPU)

For ``--n`` held-out two-shape scenes (one generic shape per half, random shape, colour, position and size; white
plain background) lorakit's regional sampling runs twice on the toy base with the same seeds: regions = the two
halves with each shape's prompt, global prompt = the background; once without a condition and once with the
scene's silhouette through the T2I-Adapter (``--weight``). Per image:

* **follows the sketch**: IoU of the drawn foreground (pixels far from the border's median colour) with the silhouette
  >= ``--iou`` (default 0.5); also the mean IoU;
* **each region shows its shape where the sketch puts it**: the toy oracle reads a 16 x 16 window centred on the
  sketch's shape, scaled to 32 x 32 (the toy shapes here are smaller than the oracle's training scenes; on the
  renders themselves this view finds every shape and colour), and says whether it shows that region's prompted
  colour and shape; rates per region (n = 2 per scene) and per scene (both regions).

Prints one JSON line per arm (rates with n and 95% Wilson intervals) and one paired comparison (exact McNemar
on the same scenes and seeds; a sign test on the per-scene IoU), and with ``--out`` writes them with per-image values to a JSON file.

    python tools/measure_toy_sketch_adapter.py --adapter data/toy-sketch-adapter --n 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorakit.eval.stats import mcnemar_exact, wilson  # noqa: E402
from lorakit.toyworld.regional_demo import foreground, iou  # noqa: E402


def region_views(image, scene, side: int = 16):
    """For each shape of ``scene``: the ``side`` x ``side`` window of ``image`` centred on where the sketch puts it
    (moved inside the image), scaled to the image size (what the oracle reads)."""
    from PIL import Image

    w, h = image.size
    out = []
    for p in scene.shapes:
        x0 = int(round(min(max(p.cx * w - side / 2, 0), w - side)))
        y0 = int(round(min(max(p.cy * h - side / 2, 0), h - side)))
        out.append(image.crop((x0, y0, x0 + side, y0 + side)).resize((w, h), Image.BILINEAR))
    return out


def rate(values: list[bool]) -> dict:
    k, n = int(sum(values)), len(values)
    lo, hi = wilson(k, n)
    return {"k": k, "n": n, "rate": round(k / n, 4) if n else None, "ci95": [round(lo, 4), round(hi, 4)]}


def paired(a: list[bool], b: list[bool]) -> dict:
    """b vs a on the same items: wins = b only, losses = a only."""
    wins = sum(1 for x, y in zip(a, b) if y and not x)
    losses = sum(1 for x, y in zip(a, b) if x and not y)
    return {"wins": wins, "losses": losses, "p_mcnemar": float(f"{mcnemar_exact(wins, losses):.3g}")}


def add_shared_options(ap: argparse.ArgumentParser, images: str, base: str | None = str(ROOT / "data" / "toy-base"),
                       adapter: str | None = str(ROOT / "data" / "toy-sketch-adapter")) -> None:
    """The options this measurement shares with tools/measure_regional_sketch.py (``images``: --images' help;
    ``base`` / ``adapter``: their defaults)."""
    ap.add_argument("--base", default=base)
    ap.add_argument("--adapter", default=adapter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--iou", type=float, default=0.5, help="IoU that counts as following the sketch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="JSON file with the summary and per-image values")
    ap.add_argument("--images", help=images)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64, help="scenes (each sampled with and without the adapter)")
    ap.add_argument("--seed", type=int, default=1000, help="scene seed (training used 0) and first sampling seed")
    ap.add_argument("--weight", type=float, default=1.0, help="adapter weight")
    add_shared_options(ap, images="folder for the images (PNG) of both arms")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lorakit.sampling import SamplerSettings
    from lorakit.toyworld.oracle import load_oracle
    from lorakit.toyworld.regional_demo import load_sketch_pipeline
    from lorakit.toyworld.sketch import random_sketch_scene

    pipe, _, adapter = load_sketch_pipeline(args.base, args.adapter, [], loras=[])  # the base alone: no LoRA
    oracle = load_oracle()
    rng = np.random.default_rng(args.seed)
    scenes = [random_sketch_scene(rng, 2, "plain", "white") for _ in range(args.n)]
    settings = SamplerSettings(method="merge", steps=args.steps, cfg=args.cfg)
    arms = {"regional": None, "regional+sketch": args.weight}
    per: dict[str, list[dict]] = {a: [] for a in arms}
    t0 = time.time()
    if args.images:
        Path(args.images).mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes):
        for arm, row in _scene_rows(pipe, oracle, settings, adapter, args, i, scene, arms).items():
            per[arm].append(row)
    summary = {"n": args.n, "steps": args.steps, "cfg": args.cfg, "weight": args.weight, "iou_threshold": args.iou,
               "seconds": round(time.time() - t0, 1)}
    lines = _summary_lines(per, summary)
    for line in lines:
        print(json.dumps(line), flush=True)
    if args.out:
        from lorakit.fileio import write_json

        write_json({"summary": lines, "per_image": per, "command": " ".join(sys.argv)}, args.out)
    return 0


def _scene_rows(pipe, oracle, settings, adapter, args, i: int, scene, arms: dict) -> dict[str, dict]:
    """Scene ``i`` sampled in each arm (same seed) and scored: sketch IoU, each region's shape and colour."""
    from lorakit.sampling import generate
    from lorakit.sampling.conditions import Condition
    from lorakit.sampling.regional import Region, RegionSpec
    from lorakit.toyworld.sketch import HALVES, render_sketch_scene, silhouette_image

    _, sil = render_sketch_scene(scene)
    prompts = scene.region_prompts()
    spec = RegionSpec(scene.background_prompt(), "", [Region(b, p) for b, p in zip(HALVES, prompts)])
    out = {}
    for arm, weight in arms.items():
        conds = None if weight is None else [Condition(adapter, silhouette_image(sil), weight)]
        images, _ = generate(pipe, [], settings, "", "", [args.seed + i], regions=spec, conditions=conds)
        img = images[0]
        if args.images:
            img.save(Path(args.images) / f"{i:03d}-{arm}.png")
        fg = foreground(img)
        target = sil > 0.5
        shape_ok, color_ok = [], []
        for p, view in zip(scene.shapes, region_views(img, scene)):
            present = oracle.score([view], [p.shape, p.color]).present[0].tolist()
            shape_ok.append(bool(present[0]))
            color_ok.append(bool(present[1]))
        out[arm] = {"scene": i, "iou": round(iou(fg, target), 4), "follows": iou(fg, target) >= args.iou,
                    "shape_ok": shape_ok, "color_ok": color_ok, "both_color": all(color_ok),
                    "both_color_and_shape": all(shape_ok) and all(color_ok), "prompts": prompts}
    return out


def _summary_lines(per: dict[str, list[dict]], summary: dict) -> list[dict]:
    """One line per arm (rates with Wilson intervals) and the paired comparison of the two arms."""
    lines = []
    for arm, rows in per.items():
        line = {"arm": arm, **summary, "follows_sketch": rate([r["follows"] for r in rows]),
                "mean_iou": round(float(np.mean([r["iou"] for r in rows])), 4),
                "region_color": rate([v for r in rows for v in r["color_ok"]]),
                "region_shape": rate([v for r in rows for v in r["shape_ok"]]),
                "both_regions_color": rate([r["both_color"] for r in rows]),
                "both_regions_color_and_shape": rate([r["both_color_and_shape"] for r in rows])}
        lines.append(line)
    a, b = per["regional"], per["regional+sketch"]
    flat = lambda rows, key: [v for r in rows for v in r[key]]  # noqa: E731
    lines.append({"compare": "regional+sketch vs regional", "follows_sketch": paired([r["follows"] for r in a], [r["follows"] for r in b]),
                  "region_color": paired(flat(a, "color_ok"), flat(b, "color_ok")),
                  "region_shape": paired(flat(a, "shape_ok"), flat(b, "shape_ok")),
                  "both_regions_color": paired([r["both_color"] for r in a], [r["both_color"] for r in b]),
                  "both_regions_color_and_shape": paired([r["both_color_and_shape"] for r in a], [r["both_color_and_shape"] for r in b]),
                  "iou": {"higher_with_sketch": sum(1 for x, y in zip(a, b) if y["iou"] > x["iou"]),
                          "lower_with_sketch": sum(1 for x, y in zip(a, b) if y["iou"] < x["iou"]),
                          "p_sign_test": float(f"{mcnemar_exact(sum(1 for x, y in zip(a, b) if y['iou'] > x['iou']), sum(1 for x, y in zip(a, b) if y['iou'] < x['iou'])):.3g}"),
                          "mean_difference": round(float(np.mean([y["iou"] - x["iou"] for x, y in zip(a, b)])), 4)}})
    return lines


if __name__ == "__main__":
    sys.exit(main())
