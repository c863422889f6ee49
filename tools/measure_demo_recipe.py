"""Does a LoRA pair keep the demo's concepts? The v2 demo's rows for two pairs of LoRA files, paired by seed.

``lorakit demo`` shows 8 images per row; a shorter training recipe for its LoRAs is only worth having if each
LoRA alone still draws its concept and merge still draws both. This generates the rows ``<character>_only``,
``<second>_only`` and ``merge`` (the demo's prompt, scale, sampler and seeds ``0..n-1``) with pair A and with
pair B, scores them with the bundled v2 oracle and prints one JSON line per row: each pair's rate of the row's
concept(s) (n, Wilson 95%) and the exact McNemar test of A against B on the same seeds (``wins``: seeds where
only A has it).

    python tools/measure_demo_recipe.py --a KWIBBIT_A NOCTURO_A --b KWIBBIT_B NOCTURO_B --n 32
"""

from __future__ import annotations

import argparse
import json


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", nargs=2, required=True, metavar=("CHARACTER", "SECOND"), help="pair A's LoRA files")
    p.add_argument("--b", nargs=2, required=True, metavar=("CHARACTER", "SECOND"), help="pair B's LoRA files")
    p.add_argument("--character", default=None, help="the character identity (default: the demo's)")
    p.add_argument("--second", default=None, help="the second identity (default: the demo's)")
    p.add_argument("--n", type=int, default=32, help="seeds 0..n-1 per row (default 32)")
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default: the demo's)")
    return p


def row_hits(files: list[str], character: str, second: str, n: int, sample_steps: int | None) -> dict:
    """``{row: [per seed: did the oracle find the row's concept(s)]}`` for one pair of LoRA files."""
    from lorakit.toyworld.demo import DemoSettings, get_world
    from lorakit.toyworld.demo_rows import BATCH, RowRunner

    world = get_world("v2")
    s = DemoSettings(character=character, second=second, scale=world.default_scale, k=n)
    if sample_steps is not None:
        s.sample_steps = sample_steps
    runner = RowRunner(s, {character: {"path": files[0]}, second: {"path": files[1]}},
                     world.prompt(character, second), world)
    wanted = {f"{character}_only": [character], f"{second}_only": [second], "merge": [character, second]}
    seeds = list(range(n))
    out = {}
    for row, names in wanted.items():
        gen, _ = runner.setup(row)
        images = [im for i in range(0, n, BATCH) for im in gen(seeds[i:i + BATCH])]
        probs = world.score(images, [character, second]).probs
        cols = [[character, second].index(name) for name in names]
        out[row] = [all(float(p[c]) >= 0.5 for c in cols) for p in probs]
    return out


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from lorakit.eval.stats import paired, rate
    from lorakit.toyworld.v2.demo import WORLD

    character = args.character or WORLD.default_character
    second = args.second or WORLD.default_second
    a = row_hits(args.a, character, second, args.n, args.sample_steps)
    b = row_hits(args.b, character, second, args.n, args.sample_steps)
    for row in a:
        print(json.dumps({"row": row, "n": args.n, "a": rate(sum(a[row]), args.n), "b": rate(sum(b[row]), args.n),
                          "a_vs_b": paired(a[row], b[row]), "a_files": args.a, "b_files": args.b}), flush=True)
    return 0


if __name__ == "__main__":
    from lorakit.errors import run_guarded
    from lorakit.threads import configure_threads

    configure_threads()
    raise SystemExit(run_guarded(main, "measure_demo_recipe"))
