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

from probe_v2_common import add_probe_args, load_probe

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
    add_probe_args(p, k=4)
    p.add_argument("--cells", nargs="+", type=parse_cell, required=True, metavar="METHOD:SCALE:START")
    args = p.parse_args(argv)

    from bench_composition import SAMPLER_SETTINGS  # the benchmark's method names -> sampler settings
    from lorakit.sampling import SamplerSettings, generate
    from lorakit.toyworld.v2.composition import presence

    probe = load_probe(args, "probe_adapter_start")
    if probe is None:
        return 2
    sets, files, pipe, loaded, oracle, seeds = probe
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
