"""Two characters placed by their sketches: regional sampling with and without the toy sketch adapter (CPU).

For ``--n`` held-out scenes per layout (one character per half, random size and place inside its half, white
plain background; layouts: the two characters as given, then swapped) lorakit's regional sampling runs on a toy
base with the characters' adapters loaded (``--method``), regions = the two halves with each character's
caption, and a global prompt; once without a condition and once with the scene's silhouette (both characters,
each in its box) through the sketch adapter, weighted per region (``--weight``). Same seeds, prompts and
adapters in both arms.

* ``--world v2`` (default): ``data/toy2-base``, ``data/toy2-sketch-adapter``, the v2 oracle, characters
  ``kwibbit zorbo``; adapters ``--loras``: plain LoRAs (each at ``--scale``; default the recipe LoRAs of
  ``--lora-dir``, ``artifacts/toy2_loras``) or ED-LoRA files, fused or not (``lorakit fuse --method gradient
  --out-format adapter``; scale 1), whose pseudo-words replace the identity names in every prompt, as Mix-of-Show
  samples a fused model: region prompts ``<kwibbit1> <kwibbit2> frog, white plain background``, global prompt
  the whole caption ``<kwibbit1> <kwibbit2> frog, <zorbo1> <zorbo2> robot, white plain background``.
* ``--world v1``: ``data/toy-base``, ``data/toy-sketch-adapter``, the toy oracle, characters ``frog robot``, the
  toy LoRA cache's LoRAs (trained there when missing), region prompts ``kwibbit, white plain background``, global
  prompt the background.
* ``--world v2 --characters frog robot`` (class characters, any of frog / robot / ghost): the base alone, no
  adapter: what the sketch adapter does where no LoRA is involved (region prompts ``red frog, white plain
  background``).

Per image:

* **region shows its character there**: the oracle reads, for each character, the square window around where
  its sketch puts it (the sprite 0.8 of the window side), with the other half painted over in the image's border
  colour, scaled to the image size; also counted: the window shows the *other* region's character (a swap). On
  the renders themselves (rows ``arm: render``): v1 finds the frog in 91% and the robot in 100% of 100 scenes, v2
  kwibbit and zorbo in 182 of 200 regions, never the other character;
* **follows the sketch**: IoU of the drawn foreground (pixels far from the border's median colour) with the
  silhouette >= ``--iou`` (default 0.5); also the mean IoU.

Prints one JSON line per (layout, arm) and per arm over both layouts (rates with n and 95% Wilson intervals), and
the paired comparisons (exact McNemar on the same scenes and seeds; a sign test on the per-scene IoU); ``--out``
writes them with per-image values. Rows go to ``<out>.partial.jsonl`` as they come: a call with ``--budget-s``
stops after that many seconds (exit 3) and the next call with the same settings continues from those rows;
``--summarize`` that file summarizes a run stopped early. ``--images``: the PNGs of both arms with
``sheet.html`` (4x enlarged, the oracle's verdicts).

    OMP_NUM_THREADS=1 flock /work/heavy.lock python tools/measure_regional_sketch.py \
        --loras artifacts/edlora_v2/fused/zorbo+kwibbit-gradient.safetensors --n 32 --out metrics.json \
        --budget-s 540          # repeat while it exits 3
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
    from lorakit.toyworld.regional_demo import DEFAULT_WORLD, WORLDS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shared_options(ap, images="folder for the images (PNG) of both arms, the sketches and the targets",
                       base=None, adapter=None)
    ap.add_argument("--world", choices=tuple(WORLDS), default=DEFAULT_WORLD, help="toy world (default v2)")
    ap.add_argument("--characters", nargs=2, help="left and right character, then swapped (default: v2 kwibbit "
                                                  "zorbo, v1 frog robot)")
    ap.add_argument("--loras", nargs="+", help="adapter files: plain LoRAs or ED-LoRAs (fused or not); default: "
                                               "v1 the toy LoRA cache, v2 the recipe LoRAs in --lora-dir")
    ap.add_argument("--lora-dir", default=str(ROOT / "artifacts" / "toy2_loras"),
                    help="v2: the cache of tools/train_toy2_loras.py (default artifacts/toy2_loras)")
    ap.add_argument("--n", type=int, default=64, help="scenes per layout (each sampled with and without the adapter)")
    ap.add_argument("--seed", type=int, default=2000, help="scene seed and first sampling seed")
    ap.add_argument("--method", default="merge")
    ap.add_argument("--uncond", default="adapter", help="adapter | base (SamplerSettings.uncond)")
    ap.add_argument("--scale", type=float, default=0.8, help="LoRA scale of plain LoRAs (ED-LoRAs: 1)")
    ap.add_argument("--weight", type=float, default=1.0, help="adapter weight in each region")
    ap.add_argument("--budget-s", type=float, help="stop after this many seconds (exit 3); the next call with the "
                                                   "same settings continues (needs --out)")
    ap.add_argument("--summarize", help="summarize the rows of a stopped run (<out>.partial.jsonl) instead of sampling")
    ap.add_argument("--sheet", type=int, default=8, help="with --images: sheet.html shows this many scenes per layout")
    args = ap.parse_args(argv)
    world = WORLDS[args.world]
    args.base = args.base or world.base
    args.adapter = args.adapter or world.adapter
    args.characters = args.characters or list(world.characters)
    if args.budget_s and not args.out:
        ap.error("--budget-s needs --out (the rows to continue from)")
    return args


def settings_of(args) -> dict:
    """What a continued run must share with the rows it continues."""
    return {k: getattr(args, k) for k in ("world", "characters", "n", "seed", "method", "uncond", "scale", "weight",
                                          "steps", "cfg", "iou")} | {
        "base": str(Path(args.base).resolve()), "adapter": str(Path(args.adapter).resolve()),
        "loras": [str(Path(p).resolve()) for p in args.loras or []]}


def read_rows(path: Path) -> tuple[dict | None, list[dict]]:
    """A partial file's settings line and its rows."""
    settings, rows = None, []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "settings" in r:
            settings = r["settings"]
        else:
            rows.append(r)
    return settings, rows


def read_partial(args, per: dict) -> dict:
    """``--summarize``: the rows of a run stopped early, cut to complete (scene, both arms) pairs of both layouts
    (sets ``args.n`` to their number)."""
    for r in read_rows(Path(args.summarize))[1]:
        per[r.pop("layout")].setdefault(r.pop("arm"), []).append(r)
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


def default_loras(args) -> list | None:
    """v2 without ``--loras``: none for class characters, else the characters' recipe LoRAs in ``--lora-dir`` (an error naming the training
    command when one is missing); v1: None (the toy LoRA cache)."""
    if args.loras or args.world == "v1":
        return args.loras
    from lorakit.toyworld.v2.composition import find_adapters
    from lorakit.toyworld.v2.concepts import CONCEPTS

    if not any(CONCEPTS[c].role == "identity" for c in args.characters):
        return []  # class characters (frog, robot, ghost): the base draws them, no LoRA
    found = find_adapters(args.lora_dir, args.base, args.characters)
    lacking = [c for c in args.characters if c not in found]
    if lacking:
        raise SystemExit(f"no v2 LoRA for {', '.join(lacking)} in {args.lora_dir} (train it: python "
                         f"tools/train_toy2_loras.py --base {args.base} --out {args.lora_dir} --identities "
                         f"{' '.join(lacking)}), or pass --loras")
    return [found[c] for c in args.characters]


def sample_all(args, layouts: dict, per: dict, t0: float) -> bool:
    """Both arms on ``--n`` scenes per layout, rows into ``per`` (and ``<out>.partial.jsonl`` as they come,
    continuing the rows there of a run with the same settings). False when ``--budget-s`` ran out first."""
    from lorakit.logs import quiet_loaded_libraries
    from lorakit.toyworld.regional_demo import ARMS, WORLDS, concept_words, load_sketch_pipeline, sample_scene
    from lorakit.toyworld.sketch import render_character_scene, silhouette_image

    quiet_loaded_libraries()
    world = WORLDS[args.world]
    pipe, adapters, sketch_adapter = load_sketch_pipeline(args.base, args.adapter, args.characters,
                                                          default_loras(args), args.scale)
    words = concept_words(adapters)
    oracle = world.load_oracle()
    rng = np.random.default_rng(args.seed)
    if args.images:
        Path(args.images).mkdir(parents=True, exist_ok=True)
    partial = Path(args.out).with_suffix(".partial.jsonl") if args.out else None
    done = {}
    if partial is not None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        settings = settings_of(args)
        old, rows = read_rows(partial) if partial.exists() else (None, [])
        if old == settings:
            done = {(r["layout"], r["scene"], r["arm"]): r for r in rows}
        else:
            partial.write_text(json.dumps({"settings": settings}) + "\n")
    # The layouts alternate, so that a run stopped early (its rows are in <out>.partial.jsonl; --summarize reads
    # them) still has both.
    for i in range(args.n):
        for lay_i, (lay, chars) in enumerate(layouts.items()):
            scene = world.random_scene(rng, chars)
            target, sil = render_character_scene(scene)
            seed = args.seed + lay_i * args.n + i
            stem = f"{lay.replace(' ', '_')}-{i:03d}"
            if args.images:
                silhouette_image(sil).save(Path(args.images) / f"{stem}-sketch.png")
                target.save(Path(args.images) / f"{stem}-target.png")
            for arm in ("render", *ARMS):
                row = done.get((lay, i, arm))
                if row is None:
                    if args.budget_s and time.time() - t0 > args.budget_s:
                        return False
                    img = target if arm == "render" else sample_scene(
                        pipe, adapters, sketch_adapter, scene, seed, arm, args.method, args.steps, args.cfg,
                        args.weight, args.uncond, words)
                    if args.images and arm != "render":
                        img.save(Path(args.images) / f"{stem}-{arm}.png")
                    row = score_image(oracle, img, scene, sil, i, seed, chars, args.iou)
                    if partial is not None:
                        with partial.open("a") as f:
                            f.write(json.dumps({"layout": lay, "arm": arm, **row}) + "\n")
                else:
                    row = {k: v for k, v in row.items() if k not in ("layout", "arm")}
                per[lay][arm].append(row)
            print(f"{lay} {i + 1}/{args.n} {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return True


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
    """One line per (layout, arm) (and the oracle on the renders, ``arm: render``), per arm over both layouts,
    and the paired comparison of the arms."""
    lines = []
    groups = {**{lay: per[lay] for lay in layouts},
              "both layouts": {a: [r for lay in layouts for r in per[lay].get(a, [])] for a in per[next(iter(layouts))]}}
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
    per: dict[str, dict[str, list[dict]]] = {lay: {a: [] for a in ("render", *ARMS)} for lay in layouts}
    t0 = time.time()
    if args.summarize:  # the rows of a run stopped early: complete (scene, both arms) pairs of both layouts
        per = read_partial(args, per)
    elif not sample_all(args, layouts, per, t0):
        print(json.dumps({"stopped": f"--budget-s {args.budget_s} reached", "rows": str(Path(args.out).with_suffix(
            ".partial.jsonl")), "more": "call again with the same arguments"}))
        return 3
    summary = {"n_per_layout": args.n, "world": args.world, "loras": [Path(p).name for p in args.loras or []],
               "method": args.method, "uncond": args.uncond, "scale": args.scale, "weight": args.weight,
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
