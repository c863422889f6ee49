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

GREEN, RED = (40, 160, 60), (200, 50, 50)


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
                found[(r["method"], seed)] = (out / "images" / r["method"] / f"n{r['n']}" / f"{set_id}-s{seed}.png",
                                              list(present))
    for m in methods:
        for s in seeds:
            if (m, s) not in found:
                raise KeyError(f"no report image of {m} on {set_id} at seed {s} in {', '.join(map(str, outs))}")
    return found


def grid(found: dict, set_: dict, methods: list[str], seeds: list[int], scale: int = 2):
    """The picture: a first row of renders, then one row per method."""
    from PIL import Image, ImageDraw

    from lorakit.toyworld.v2.composition import set_render

    size, label_w, mark_h, pad = 64 * scale, 150, 6, 2
    cell_w, cell_h = size + pad, size + mark_h + 2 * pad
    rows = [("renderer (target)", None), *((m, m) for m in methods)]
    canvas = Image.new("RGB", (label_w + len(seeds) * cell_w, len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    n = len(set_["concepts"])
    for i, (label, method) in enumerate(rows):
        y = i * cell_h
        draw.text((4, y + size // 2 - 6), label, fill="black")
        for j, seed in enumerate(seeds):
            x = label_w + j * cell_w
            if method is None:
                im, marks = set_render(set_, seed), None
            else:
                path, marks = found[(method, seed)]
                im = Image.open(path)
            canvas.paste(im.convert("RGB").resize((size, size), Image.NEAREST), (x, y + pad))
            for m, ok in enumerate(marks or []):
                top, w = y + pad + size + 2, size // n
                draw.rectangle([x + m * w + 1, top, x + (m + 1) * w - 2, top + mark_h - 1], fill=GREEN if ok else RED)
    return canvas.quantize(colors=64)


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
