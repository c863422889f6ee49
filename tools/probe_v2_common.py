"""What the toy world v2 probe tools share: their set / LoRA / oracle arguments and loading them."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def add_probe_args(p, k: int) -> None:
    """``--size``, ``--sets``, ``--k`` (default ``k``), ``--adapters-dir`` and ``--oracle``."""
    p.add_argument("--size", type=int, default=3)
    p.add_argument("--sets", nargs="+", required=True, metavar="ID")
    p.add_argument("--k", type=int, default=k, help="seeds per set (1000..1000+k-1)")
    p.add_argument("--adapters-dir", default=str(ROOT / "artifacts" / "toy2_loras"))
    p.add_argument("--oracle", default=str(ROOT / "data" / "toy2-oracle"))


def load_probe(args, tool: str):
    """``(sets, files, pipe, {identity: loaded LoRA}, oracle, seeds)`` on the bundled base, or None after one line
    on stderr naming a bad ``--sets`` or a missing recipe LoRA (the caller exits 2)."""
    from lorakit.sampling import load_adapters, load_pipeline
    from lorakit.toyworld.v2.composition import sets_with_adapters
    from lorakit.toyworld.v2.models import DEFAULT_BASE
    from lorakit.toyworld.v2.oracle import Oracle

    try:
        sets, files = sets_with_adapters(args.size, args.sets, args.adapters_dir, DEFAULT_BASE)
    except ValueError as e:
        print(f"{tool}: {e}", file=sys.stderr)
        return None
    names = sorted(files)
    pipe = load_pipeline(str(DEFAULT_BASE))
    loaded = dict(zip(names, load_adapters(pipe, [files[n] for n in names])))
    return sets, files, pipe, loaded, Oracle.load(args.oracle), list(range(1000, 1000 + args.k))
