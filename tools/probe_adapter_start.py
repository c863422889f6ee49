"""Probe ``--adapter-start`` on toy world v2 composition sets: the base samples the first steps alone (its
layout from the prompt's class words), the method's LoRAs act from then on. One JSON line per
(method, scale, start) cell: all identities found (k of n) and per set the count per slot.

    python tools/probe_adapter_start.py --size 3 --sets n3-kwibbit-hattock-nocturo n3-zorbo-hattock-nocturo \\
        --cells merge:0.6:0 merge:0.6:0.25 delta:1.0:0.25 delta-parts:1.0:0.25 --k 4

A cell is METHOD:SCALE:START (methods merge, switch, composite, delta, delta-parts); seeds 1000.. (the
benchmark's validation seeds); the recipe LoRAs of ``--adapters-dir`` on the bundled base.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("merge", "switch", "composite", "delta", "delta-parts")  # named as the benchmark names them


def parse_cell(text: str) -> tuple[str, float, float]:
    try:
        method, scale, start = text.split(":")
        if method not in METHODS:
            raise ValueError
        return method, float(scale), float(start)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected METHOD:SCALE:START, METHOD one of "
                                         f"{', '.join(METHODS)}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=3)
    p.add_argument("--sets", nargs="+", required=True, metavar="ID")
    p.add_argument("--cells", nargs="+", type=parse_cell, required=True, metavar="METHOD:SCALE:START")
    p.add_argument("--k", type=int, default=4, help="seeds per set (1000..1000+k-1)")
    p.add_argument("--adapters-dir", default=str(ROOT / "artifacts" / "toy2_loras"))
    p.add_argument("--oracle", default=str(ROOT / "data" / "toy2-oracle"))
    args = p.parse_args(argv)

    from bench_composition import SAMPLER_SETTINGS  # the benchmark's method names -> sampler settings
    from lorakit.sampling import SamplerSettings, generate, load_adapters, load_pipeline
    from lorakit.toyworld.v2.composition import composition_sets, find_adapters, presence
    from lorakit.toyworld.v2.models import DEFAULT_BASE
    from lorakit.toyworld.v2.oracle import Oracle

    sets = [s for s in composition_sets((args.size,)) if s["id"] in args.sets]
    unknown = sorted(set(args.sets) - {s["id"] for s in sets})
    if unknown:
        print(f"probe_adapter_start: --sets {' '.join(unknown)}: no such set of size {args.size}", file=sys.stderr)
        return 2
    names = sorted({n for s in sets for n in s["concepts"].values()})
    files = find_adapters(args.adapters_dir, DEFAULT_BASE, names)
    if len(files) < len(names):
        print(f"probe_adapter_start: --adapters-dir {args.adapters_dir}: no recipe LoRA for "
              f"{', '.join(n for n in names if n not in files)} (tools/train_toy2_loras.py)", file=sys.stderr)
        return 2
    pipe = load_pipeline(str(DEFAULT_BASE))
    loaded = dict(zip(names, load_adapters(pipe, [files[n] for n in names])))
    oracle, seeds = Oracle.load(args.oracle), list(range(1000, 1000 + args.k))
    for method, scale, start in args.cells:
        settings = SamplerSettings(**SAMPLER_SETTINGS.get(method, {"method": method}), steps=20, cfg=4.0,
                                   adapter_start=start)
        total, per_set, t0 = 0, [], time.perf_counter()
        for s in sets:
            ads = [replace(loaded[n], weight=scale) for n in s["concepts"].values()]
            verdict = presence(oracle, generate(pipe, ads, settings, s["prompt"], None, seeds)[0], s["concepts"])
            k = sum(all(v) for v in verdict["present"])
            total += k
            per_set.append([s["id"], k, [sum(v[i] for v in verdict["present"]) for i in range(len(s["concepts"]))]])
        print(json.dumps({"method": method, "scale": scale, "start": start, "k": total, "n": len(sets) * len(seeds),
                          "per_set": per_set, "adapters": sorted(f.name for f in files.values()),
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
