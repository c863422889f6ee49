"""The oracle ceiling of toy-world v2 composition sets: how often the oracle finds every identity of a set in the
renderer's own images of it (``lorakit.toyworld.v2.composition.ceiling``), one JSON line per set.

A set whose ceiling is low measures the oracle, not the composition methods: pick the benchmark's sets among
those whose ceiling is high (``--min-rate``) before running any method on them. Rendering and scoring take about
a second per 16 images on one CPU thread; no LoRA is needed. ``--vae BASE`` scores the renders after a round trip
through that pipeline's VAE (encode, decode), as every generated image goes: a look the VAE blurs (pixlor's old
4-pixel blocks) lowers this ceiling, not the renders'.

``--classes`` scores each set's class version instead (every identity replaced by its class, as the base knows
it: ``green frog, red hat, night background``; the oracle asks for the classes), and ``--base PIPELINE`` (which
implies it) has that pipeline draw those captions (20 steps, CFG 4, the seeds' generators): how often the base
itself puts the set's N kinds of thing in one image, a bound on what composing LoRAs on that base can do that
the renders do not give.

    python tools/composition_ceilings.py --sizes 3 4 --k 64 --out docs/data/composition_v2_ceiling_n34.jsonl
    python tools/composition_ceilings.py --sizes 3 --k 32 --min-rate 0.8      # print only the usable sets
    python tools/composition_ceilings.py --sizes 4 --k 32 --vae data/toy2-base  # through the base's VAE
    python tools/composition_ceilings.py --sizes 2 3 4 --k 32 --base data/toy2-base  # the base's class images
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[3, 4], help="set sizes N (default 3 4)")
    p.add_argument("--sets", nargs="+", metavar="ID", help="only these set ids")
    p.add_argument("--k", type=int, default=64, help="renders per set (seeds SEED..SEED+K-1; default 64)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0: the bench's report seeds)")
    p.add_argument("--oracle", default=str(ROOT / "data" / "toy2-oracle"))
    p.add_argument("--min-rate", type=float, default=0.0, help="print and write only sets at or above this rate")
    p.add_argument("--vae", metavar="PIPELINE", help="score the renders after a round trip through this "
                   "pipeline folder's VAE (e.g. data/toy2-base)")
    p.add_argument("--classes", action="store_true", help="score each set's class version (identities replaced "
                   "by their classes)")
    p.add_argument("--base", metavar="PIPELINE", help="sample the class versions' captions with this pipeline "
                   "folder (e.g. data/toy2-base) instead of rendering them; implies --classes")
    p.add_argument("--out", help="JSON lines file to write (atomically)")
    return p.parse_args(argv)


def ceiling_rows(oracle, sets: list[dict], seeds: list[int], oracle_name: str, transform=None,
                 source: str = "render") -> list[dict]:
    """One row per set: ``{"measure", "set", "n", "oracle", "source", "seeds": [first, last], "all_present": rate}``;
    with ``transform`` (a list of PIL images -> a list of PIL images), the renders are scored after it."""
    from lorakit.toyworld.v2.composition import ceiling

    rates = ceiling(oracle, sets, seeds, transform)
    return [{"measure": "v2_composition_oracle_ceiling", "set": s["id"], "n": s["n"], "oracle": oracle_name,
             "source": source, "seeds": [seeds[0], seeds[-1]], "all_present": rates[s["id"]]} for s in sets]


def class_rows(oracle, sets: list[dict], seeds: list[int], oracle_name: str, images_of=None,
               source: str = "render") -> list[dict]:
    """One row per set's class version (``"measure": "v2_composition_class_ceiling"``), with the rate per slot."""
    from lorakit.toyworld.v2.composition import class_ceiling

    found = class_ceiling(oracle, sets, seeds, images_of)
    return [{"measure": "v2_composition_class_ceiling", "set": s["id"], "n": s["n"], "oracle": oracle_name,
             "source": source, "seeds": [seeds[0], seeds[-1]], **found[s["id"]]} for s in sets]


def base_sampler(pipeline: Path, first_seed: int):
    """``scenes -> images``: the pipeline's samples of the scenes' captions at 64 px, image ``i`` seeded by
    ``first_seed + i`` (the toy measurements' 20 steps and CFG 4)."""
    from lorakit.toyworld.evaluate import generate
    from lorakit.toyworld.v2.measure import SIZE, load_pipeline
    from lorakit.toyworld.v2.render import caption

    pipe = load_pipeline(pipeline)
    return lambda scenes: generate(pipe, [caption(s) for s in scenes], seed=first_seed, height=SIZE, width=SIZE)


def vae_transform(pipeline: Path):
    """``images -> images`` through the VAE of a pipeline folder (posterior mean, no noise)."""
    from diffusers import AutoencoderKL

    from lorakit.toyworld.v2.measure import vae_round_trip

    vae = AutoencoderKL.from_pretrained(pipeline / "vae").eval()
    return lambda images: vae_round_trip(vae, images)


def main(argv=None) -> int:
    from lorakit.toyworld.v2.composition import composition_sets

    args = parse_args(argv)
    try:
        sets = composition_sets(tuple(args.sizes))
    except ValueError as err:
        print(f"composition_ceilings: --sizes {' '.join(map(str, args.sizes))}: {err}", file=sys.stderr)
        return 2
    if args.sets:
        unknown = sorted(set(args.sets) - {s["id"] for s in sets})
        if unknown:
            print(f"composition_ceilings: --sets {' '.join(unknown)}: no such set at sizes {args.sizes}", file=sys.stderr)
            return 2
        sets = [s for s in sets if s["id"] in args.sets]
    oracle_dir = Path(args.oracle)
    if not (oracle_dir / "oracle.safetensors").exists():
        print(f"composition_ceilings: --oracle {oracle_dir}: no oracle.safetensors there (tools/train_oracle_v2.py)",
              file=sys.stderr)
        return 2
    for option, folder in (("--vae", args.vae), ("--base", args.base)):
        if folder and not (Path(folder) / "vae" / "config.json").exists():
            print(f"composition_ceilings: {option} {folder}: no vae/config.json there (a pipeline folder, e.g. "
                  "data/toy2-base)", file=sys.stderr)
            return 2
    if args.base and args.vae:
        print("composition_ceilings: --base and --vae: the base's samples went through its VAE already; give one",
              file=sys.stderr)
        return 2
    from lorakit.toyworld.v2.oracle import Oracle
    from lorakit.toyworld.v2.render import render

    transform, source = (vae_transform(Path(args.vae)), f"vae_round_trip:{args.vae}") if args.vae else (None, "render")
    seeds = list(range(args.seed, args.seed + args.k))
    name = str(oracle_dir.resolve().relative_to(ROOT)) if oracle_dir.resolve().is_relative_to(ROOT) else str(oracle_dir)
    oracle = Oracle.load(oracle_dir)
    if args.base:
        found = class_rows(oracle, sets, seeds, name, base_sampler(Path(args.base), seeds[0]),
                           f"base_samples:{args.base}")
    elif args.classes:
        found = class_rows(oracle, sets, seeds, name,
                           (lambda scenes: transform([render(sc) for sc in scenes])) if transform else None, source)
    else:
        found = ceiling_rows(oracle, sets, seeds, name, transform, source)
    rows = [r for r in found if r["all_present"]["rate"] >= args.min_rate]
    for r in rows:
        print(json.dumps(r))
    if args.out:
        from lorakit.fileio import write_text

        write_text("".join(json.dumps(r) + "\n" for r in rows), Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
