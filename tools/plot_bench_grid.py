"""One picture of a composition benchmark run: the renderer's image of a set (what the prompt asks for), then one
row per method, the same seeds in every column, each image enlarged (nearest neighbour) with one mark per concept
under it (green: the oracle finds it; red: not), in the set's order.

    python tools/plot_bench_grid.py OUT_A OUT_B --set n4-kwibbit-shroomel-inkvel-chekka \
        --methods merge switch composite cmlora delta-classes --seeds 0 1 2 3 4 5 6 7 8 9 10 11 --out grid.png

OUT folders are ``tools/bench_composition.py --world v2 --out`` folders (their ``results.jsonl`` report rows and
``images/``). Exit status 2 with one line for a set, method or seed that none of them holds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_composition import image_stem

def verdicts(outs: list[Path], set_id: str, methods: list[str], seeds: list[int]) -> dict:
    """``{(method, seed): (image path, [found per concept])}`` from the report rows of ``outs``; KeyError naming
    the first missing cell."""
    found = {}
    for out in outs:
        for line in (out / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("phase") != "report" or r["set"] != set_id or r["method"] not in methods:
                continue
            for seed, present in zip(r["seeds"], r["present"]):
                stem = image_stem(out, r["method"], r["n"], set_id, seed)
                found[(r["method"], seed)] = (stem.with_suffix(".png"), list(present))
    for m in methods:
        for s in seeds:
            if (m, s) not in found:
                raise KeyError(f"no report image of {m} on {set_id} at seed {s} in {', '.join(map(str, outs))}")
    return found


def grid(found: dict, set_: dict, methods: list[str], seeds: list[int], scale: int = 2):
    """The picture: a first row of renders, then one row per method (:func:`lorakit.toyworld.demo_report.image_grid`)."""
    from PIL import Image

    from lorakit.toyworld.demo_report import image_grid
    from lorakit.toyworld.v2.composition import set_render

    rows = [("renderer (target)", [set_render(set_, s).convert("RGB") for s in seeds], None)]
    for m in methods:
        images = []
        for s in seeds:
            with Image.open(found[(m, s)][0]) as im:
                images.append(im.convert("RGB"))
        rows.append((m, images, [found[(m, s)][1] for s in seeds]))
    return image_grid(rows, 64 * scale, label_w=150)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outs", nargs="+", type=Path, help="bench_composition.py --out folders")
    p.add_argument("--set", required=True, help="a set id (bench_composition.py --dry-run lists them)")
    p.add_argument("--methods", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(8)))
    p.add_argument("--out", required=True, help="the PNG to write")
    args = p.parse_args(argv)
    from lorakit.fileio import save_image
    from lorakit.toyworld.v2.composition import composition_sets

    sets = {s["id"]: s for s in composition_sets()}
    try:
        if args.set not in sets:
            raise KeyError(f"--set {args.set}: not a v2 composition set")
        found = verdicts(args.outs, args.set, args.methods, args.seeds)
    except (KeyError, OSError) as err:
        print(f"plot_bench_grid: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    save_image(grid(found, sets[args.set], args.methods, args.seeds), args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
