"""Two characters placed by their sketches: regional sampling with and without the toy sketch adapter (CPU).

For ``--n`` held-out scenes per layout (one character per half, random size and place inside its half, white
plain background; layouts: the two characters as given, then swapped) lorakit's regional sampling runs on the toy
base with both characters' LoRAs loaded (``--method``, each LoRA at ``--scale``), regions = the two halves with
each character's caption (``kwibbit, white plain background``), global prompt = the background; once without a
condition and once with the scene's silhouette (both characters, each in its box) through the sketch adapter,
weighted per region (``--weight``). Same seeds, prompts and LoRA scale in both arms. Per image:

* **region shows its character there**: the toy oracle reads, for each character, the square window around where
  its sketch puts it (the sprite 0.8 of the window side, as large as the oracle knows characters best), with the
  other half painted over in the image's border colour, scaled to 32 x 32; on the renders themselves this view
  finds the frog in 91% and the robot in 100% of 100 scenes and never the other character. Also counted: the
  window shows the *other* region's character (a swap);
* **follows the sketch**: IoU of the drawn foreground (pixels far from the border's median colour) with the
  silhouette >= ``--iou`` (default 0.5); also the mean IoU.

Prints one JSON line per (layout, arm) and per arm over both layouts (rates with n and 95% Wilson intervals), and
the paired comparisons (exact McNemar on the same scenes and seeds; a sign test on the per-scene IoU); ``--out``
writes them with per-image values (and, while running, each row to ``<out>.partial.jsonl``: ``--summarize`` that
file summarizes a run stopped early), ``--images`` the PNGs of both arms with ``sheet.html`` (4x enlarged, the
oracle's verdicts).

    OMP_NUM_THREADS=1 flock /work/heavy.lock python tools/measure_regional_sketch.py --n 64 --out metrics.json
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

from lorakit.eval.stats import mcnemar_exact, paired, rate  # noqa: E402
from measure_toy_sketch_adapter import add_shared_options  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shared_options(ap, images="folder for the images (PNG) of both arms, the sketches and the targets")
    ap.add_argument("--characters", nargs=2, default=["frog", "robot"], help="left and right character (then swapped)")
    ap.add_argument("--loras", nargs=2, help="their LoRA files (default: the toy LoRA cache, trained if missing)")
    ap.add_argument("--n", type=int, default=64, help="scenes per layout (each sampled with and without the adapter)")
    ap.add_argument("--seed", type=int, default=2000, help="scene seed and first sampling seed")
    ap.add_argument("--method", default="merge")
    ap.add_argument("--uncond", default="adapter", help="adapter | base (SamplerSettings.uncond)")
    ap.add_argument("--scale", type=float, default=0.8, help="LoRA scale of both characters")
    ap.add_argument("--weight", type=float, default=1.0, help="adapter weight in each region")
    ap.add_argument("--summarize", help="summarize the rows of a stopped run (<out>.partial.jsonl) instead of sampling")
    ap.add_argument("--sheet", type=int, default=8, help="with --images: sheet.html shows this many scenes per layout")
    return ap.parse_args(argv)


def read_partial(args, per: dict) -> dict:
    """``--summarize``: the rows of a run stopped early, cut to complete (scene, both arms) pairs of both layouts
    (sets ``args.n`` to their number)."""
    for line in Path(args.summarize).read_text().splitlines():
        r = json.loads(line)
        per[r.pop("layout")][r.pop("arm")].append(r)
    args.n = min(len(rows) for arms in per.values() for rows in arms.values())
    return {lay: {a: rows[: args.n] for a, rows in arms.items()} for lay, arms in per.items()}


def score_image(oracle, img, scene, sil, i: int, seed: int, chars, iou_threshold: float) -> dict:
    """One image's row: each region's own / other character (oracle) and the IoU with the sketch."""
    from lorakit.toyworld.regional_demo import character_views, foreground, iou

    own, other = [], []
    for c, view, o in zip(scene.characters, character_views(img, scene), reversed(scene.characters)):
        p = oracle.score([view], [c.name, o.name]).present[0].tolist()
        own.append(bool(p[0]))
        other.append(bool(p[1]))
    v = iou(foreground(img), sil > 0.5)
    return {"scene": i, "seed": seed, "characters": list(chars), "iou": round(v, 4),
            "follows": v >= iou_threshold, "own": own, "other": other, "both": all(own),
            "both_and_follows": all(own) and v >= iou_threshold, "any_swap": any(other)}


def sample_all(args, layouts: dict, per: dict, t0: float) -> None:
    """Both arms on ``--n`` scenes per layout, rows into ``per`` (and ``<out>.partial.jsonl`` as they come)."""
    from lorakit.logs import quiet_loaded_libraries
    from lorakit.toyworld.regional_demo import ARMS, load_sketch_pipeline, sample_scene
    from lorakit.toyworld.sketch import random_character_scene, render_character_scene, silhouette_image

    quiet_loaded_libraries()
    pipe, adapters, sketch_adapter = load_sketch_pipeline(args.base, args.adapter, args.characters, args.loras,
                                                          args.scale)
    from lorakit.toyworld.oracle import load_oracle

    oracle = load_oracle()
    rng = np.random.default_rng(args.seed)
    if args.images:
        Path(args.images).mkdir(parents=True, exist_ok=True)
    partial = Path(args.out).with_suffix(".partial.jsonl") if args.out else None
    if partial is not None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text("")
    # The layouts alternate, so that a run stopped early (its rows are in <out>.partial.jsonl; --summarize reads
    # them) still has both.
    for i in range(args.n):
        for lay_i, (lay, chars) in enumerate(layouts.items()):
            scene = random_character_scene(rng, chars)
            target, sil = render_character_scene(scene)
            seed = args.seed + lay_i * args.n + i
            stem = f"{lay.replace(' ', '_')}-{i:03d}"
            if args.images:
                silhouette_image(sil).save(Path(args.images) / f"{stem}-sketch.png")
                target.save(Path(args.images) / f"{stem}-target.png")
            for arm in ARMS:
                img = sample_scene(pipe, adapters, sketch_adapter, scene, seed, arm, args.method, args.steps, args.cfg,
                                   args.weight, args.uncond)
                if args.images:
                    img.save(Path(args.images) / f"{stem}-{arm}.png")
                row = score_image(oracle, img, scene, sil, i, seed, chars, args.iou)
                per[lay][arm].append(row)
                if partial is not None:
                    with partial.open("a") as f:
                        f.write(json.dumps({"layout": lay, "arm": arm, **row}) + "\n")
            print(f"{lay} {i + 1}/{args.n} {time.time() - t0:.0f}s", file=sys.stderr, flush=True)


def arm_line(rows: list[dict], characters) -> dict:
    flat = lambda key: [x for r in rows for x in r[key]]  # noqa: E731
    return {"both_regions_own_character": rate(sum(r["both"] for r in rows), len(rows)),
            "follows_sketch": rate(sum(r["follows"] for r in rows), len(rows)),
            "both_and_follows": rate(sum(r["both_and_follows"] for r in rows), len(rows)),
            "mean_iou": round(float(np.mean([r["iou"] for r in rows])), 4),
            "region_own_character": rate(sum(flat("own")), len(flat("own"))),
            "region_other_character": rate(sum(flat("other")), len(flat("other"))),
            **{f"region_{name}": rate(sum(o for r in rows for c, o in zip(r["characters"], r["own"]) if c == name),
                                      sum(1 for r in rows for c in r["characters"] if c == name))
               for name in characters}}


def compare(a: list[dict], b: list[dict]) -> dict:
    up = sum(1 for x, y in zip(a, b) if y["iou"] > x["iou"])
    down = sum(1 for x, y in zip(a, b) if y["iou"] < x["iou"])
    return {key: paired([x[key] for x in b], [x[key] for x in a]) for key in ("both", "follows", "both_and_follows")} | {
        "iou": {"higher_with_sketch": up, "lower_with_sketch": down,
                "p_sign_test": float(f"{mcnemar_exact(up, down):.3g}"),
                "mean_difference": round(float(np.mean([y["iou"] - x["iou"] for x, y in zip(a, b)])), 4)}}


def summary_lines(args, layouts: dict, per: dict, summary: dict, arms_order) -> list[dict]:
    """One line per (layout, arm), per arm over both layouts, and the paired comparison of the arms."""
    lines = []
    groups = {**{lay: per[lay] for lay in layouts},
              "both layouts": {a: [r for lay in layouts for r in per[lay][a]] for a in arms_order}}
    for name, arms in groups.items():
        for arm, rows in arms.items():
            lines.append({"layout": name, "arm": arm, "n": len(rows), **arm_line(rows, args.characters), **summary})
        lines.append({"layout": name, "compare": "regional+sketch vs regional (wins: with the sketch only)",
                      **compare(arms[arms_order[0]], arms[arms_order[1]])})
    return lines


def write_contact_sheet(args, layouts: dict, per: dict) -> None:
    """``sheet.html`` in ``--images``: the first ``--sheet`` scenes per layout with the oracle's verdicts."""
    from lorakit.toyworld.regional_demo import ARMS, write_sheet

    sheet = []
    for lay in layouts:
        for i in range(min(args.sheet, args.n)):
            stem = f"{lay.replace(' ', '_')}-{i:03d}"
            verdicts = {}
            for arm in ARMS:
                r = per[lay][arm][i]
                marks = " ".join(c.upper() if ok else c for c, ok in zip(r["characters"], r["own"]))
                verdicts[arm] = f"{marks}, IoU {r['iou']:.2f}"
            sheet.append({"title": f"{lay} {i}: {' | '.join(per[lay][ARMS[0]][i]['characters'])}, seed "
                                   f"{per[lay][ARMS[0]][i]['seed']}",
                          "images": {"sketch": f"{stem}-sketch.png", "target (render)": f"{stem}-target.png",
                                     **{arm: f"{stem}-{arm}.png" for arm in ARMS}},
                          "verdicts": verdicts})
    print(f"wrote {write_sheet(args.images, sheet)}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    from lorakit.toyworld.regional_demo import ARMS

    layouts = {"as given": tuple(args.characters), "swapped": tuple(reversed(args.characters))}
    per: dict[str, dict[str, list[dict]]] = {lay: {a: [] for a in ARMS} for lay in layouts}
    t0 = time.time()
    if args.summarize:  # the rows of a run stopped early: complete (scene, both arms) pairs of both layouts
        per = read_partial(args, per)
    else:
        sample_all(args, layouts, per, t0)
    summary = {"n_per_layout": args.n, "method": args.method, "uncond": args.uncond, "scale": args.scale, "weight": args.weight,
               "steps": args.steps, "cfg": args.cfg, "iou_threshold": args.iou,
               "seconds": None if args.summarize else round(time.time() - t0, 1)}
    lines = summary_lines(args, layouts, per, summary, ARMS)
    for line in lines:
        print(json.dumps(line), flush=True)
    if args.images and args.sheet:
        write_contact_sheet(args, layouts, per)
    if args.out:
        from lorakit.fileio import write_json

        write_json({"summary": lines, "per_image": per, "command": " ".join(["python", *sys.argv])}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
