"""Does a merged content + style LoRA still draw the content identity, and on which prompt does it lose it?

For one character + style pair of toy world v2 (``--pair zorbo inkvel``), each adapter in ``--adapters``
(``NAME=FILE[@SCALE]``: a LoRA alone, or a merged pair from ``lorakit fuse --method lorarar / ziplora`` or the
benchmark's fused folder) is sampled on two prompts: the content identity's own caption (``zorbo robot, white plain
background``) and the pair's caption (``zorbo robot, white plain background, inkvel outline style``). One JSON line
per (adapter, prompt): how many of the ``--k`` images (seeds 0..k-1, 20 DDIM steps, guidance 4) the v2 oracle
finds each identity in. ``base`` (no adapter) is always a row.

    python tools/probe_pair_merge_prompts.py --pair zorbo inkvel --k 32 \\
        --adapters zorbo=artifacts/toy2_loras/toy2_zorbo-cf85698e92095b1a.safetensors@0.8 lorarar=merged.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_adapter(item: str) -> tuple[str, str, float]:
    """``NAME=FILE[@SCALE]`` -> (name, file, scale); ValueError naming the item otherwise."""
    name, sep, rest = item.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--adapters {item!r}: expected NAME=FILE[@SCALE]")
    path, at, scale = rest.rpartition("@") if "@" in rest else (rest, "", "1.0")
    try:
        return name, path, float(scale)
    except ValueError:
        raise ValueError(f"--adapters {item!r}: the scale after @ must be a number") from None


def pair_prompts(content: str, style: str) -> dict[str, str]:
    """The content identity's own caption and the pair's caption, as the recipes and the benchmark write them."""
    from lorakit.toyworld.v2.composition import set_scene
    from lorakit.toyworld.v2.render import caption

    return {"content-caption": caption(set_scene({"character": content})),
            "pair-caption": caption(set_scene({"character": content, "style": style}))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", nargs=2, metavar=("CONTENT", "STYLE"), required=True)
    p.add_argument("--adapters", nargs="+", default=[], metavar="NAME=FILE[@SCALE]")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--base", default=None, help="the v2 base (default: data/toy2-base)")
    args = p.parse_args(argv)
    try:
        adapters = [parse_adapter(a) for a in args.adapters]
    except ValueError as err:
        print(f"probe_pair_merge_prompts: {err}", file=sys.stderr)
        return 2
    from pathlib import Path

    missing = [f for _, f, _ in adapters if not Path(f).is_file()]
    if missing:
        print(f"probe_pair_merge_prompts: no such adapter file: {', '.join(missing)}", file=sys.stderr)
        return 2

    from lorakit.sampling import SamplerSettings, generate, load_adapters, load_pipeline
    from lorakit.toyworld.v2.models import DEFAULT_BASE
    from lorakit.toyworld.v2.oracle import Oracle

    oracle, seeds = Oracle.load(), list(range(args.k))
    settings = SamplerSettings(method="merge", steps=20, cfg=4.0)
    for name, path, scale in [("base", None, 0.0)] + adapters:
        pipe = load_pipeline(str(args.base or DEFAULT_BASE))
        loaded = load_adapters(pipe, [path], [scale]) if path else []
        for label, prompt in pair_prompts(*args.pair).items():
            images, _ = generate(pipe, loaded, settings, prompt, None, seeds)
            rates = oracle.score(images, list(args.pair)).rates
            print(json.dumps({"adapter": name, "file": path, "scale": scale, "prompt": label, "text": prompt,
                              "k": args.k, **{f"{n}_found": round(rates[n] * args.k) for n in args.pair}}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
