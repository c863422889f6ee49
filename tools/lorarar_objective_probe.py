"""Where does a LoRA.rar merge sit on ZipLoRA's own objective, next to ZipLoRA run for longer?

For one content + style pair of toy world v2 (``--pair zorbo inkvel``, the recipe LoRAs of ``--loras``), every
merge is scored on the same fixed noise batches of ZipLoRA's loss (the pair's references: each LoRA's first
``--ref-num`` training renders; the layers LoRA.rar re-weights, to_q / to_out.0) and read for how much of each
LoRA's delta it keeps (``tools/merge_delta_ratios.py``): the plain sum, each ``--hypernet`` file's merge, and
ZipLoRA's per-pair optimisation after each of ``--steps`` (from the coefficients 1, lr 0.01, as ``lorakit fuse
--method ziplora``). One JSON line per merge; ``--save DIR`` keeps the ZipLoRA merges as adapter files.

    python tools/lorarar_objective_probe.py --pair zorbo inkvel --steps 100 300 1000 \\
        --hypernet artifacts/toy2_lorarar/toy2_lorarar-zorbo-inkvel-01d6b851a0af5f7b.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kept(content, style, merged) -> dict:
    """Mean kept fraction of the content's and the style's delta over the merged layers."""
    from merge_delta_ratios import ratios, summary

    s = summary(ratios(content, style, merged))
    return {f"{part}_kept_mean": s[part]["mean"] for part in ("content", "style")}


def pair_loss(pipe, content, style, folders, ref_num: int):
    """ZipLoRA's loss of the pair on the LoRA.rar layers (LoRA.rar's training loss, ``lam`` 0.01), the references
    read from ``folders``."""
    from lorakit.fusion.ziplora import noise_scheduler_of, reference_for
    from lorakit.fusion.ziplora_plan import LORARAR_LAYERS
    from lorakit.training.lorarar import LoraEntry
    from lorakit.training.lorarar import pair_loss as lorarar_pair_loss

    c, s = (LoraEntry(name, a, reference_for(pipe, a, None, images=f, num_images=ref_num, seed=i))
            for i, (name, a, f) in enumerate(zip(("content", "style"), (content, style), folders)))
    return lorarar_pair_loss(pipe, noise_scheduler_of(pipe), c, s, LORARAR_LAYERS, 0.01)


def probe(args) -> list[dict]:
    import torch

    from lorakit.adapters.io import load_adapter, save_adapter
    from lorakit.fusion.lorarar import load_hypernet
    from lorakit.fusion.ziplora import (eval_batches, evaluate, export_merged, ones_coefficients,
                                        optimize_coefficients)
    from lorakit.models import load_base
    from lorakit.toyworld.v2.loras import ensure_data, lora_path

    base = args.base or str(ROOT / "data" / "toy2-base")
    files = [lora_path(n, args.loras, base) for n in args.pair]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"no recipe LoRA {', '.join(missing)} (train it: tools/train_toy2_loras.py)")
    content, style = (load_adapter(f) for f in files)
    lf = pair_loss(load_base(base), content, style,
                   [ensure_data(n, Path(args.loras) / "toy2-data")[0] for n in args.pair], args.ref_num)
    batches = eval_batches(lf, n=args.batches, batch_size=2, seed=args.seed)
    rows = []

    def row(name, coeffs, **extra):
        merged = export_merged(lf.plan, coeffs)
        with torch.no_grad():
            loss = evaluate(lf, coeffs, batches)
        rows.append({"pair": args.pair, "merge": name, "loss": round(loss, 5), **kept(content, style, merged), **extra})
        print(json.dumps(rows[-1]), flush=True)
        return merged

    row("sum", ones_coefficients(lf.plan, lf.device))
    for h in args.hypernet:
        with torch.no_grad():
            row(f"lorarar:{Path(h).name}", load_hypernet(h).coefficients(lf.plan, lf.deltas))
    for steps in args.steps:
        t0 = time.perf_counter()
        coeffs, hist = optimize_coefficients(lf, steps=steps, lr=0.01, seed=0)
        merged = row(f"ziplora-{steps}", coeffs, seconds=round(time.perf_counter() - t0, 1))
        if args.save:
            save_adapter(merged, Path(args.save) / f"{'-'.join(args.pair)}-ziplora{steps}.safetensors")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", nargs=2, metavar=("CONTENT", "STYLE"), required=True)
    p.add_argument("--hypernet", nargs="*", default=[], help="LoRA.rar hypernetwork files to score on the pair")
    p.add_argument("--steps", nargs="*", type=int, default=[100], help="ZipLoRA steps to score (each run starts again from coefficients 1)")
    p.add_argument("--loras", default=str(ROOT / "artifacts" / "toy2_loras"), help="the recipe LoRA cache")
    p.add_argument("--base", default=None)
    p.add_argument("--ref-num", type=int, default=8, help="reference renders per LoRA")
    p.add_argument("--batches", type=int, default=8, help="fixed noise batches (2 items each) the losses share")
    p.add_argument("--seed", type=int, default=99)
    p.add_argument("--save", default=None, help="folder for the ZipLoRA merges")
    args = p.parse_args(argv)
    from lorakit.toyworld.v2.concepts import IDENTITIES

    kinds = {c.name: c.kind for c in IDENTITIES}
    c, s = args.pair
    if kinds.get(c) not in ("character", "object") or kinds.get(s) != "style":
        print(f"lorarar_objective_probe: --pair {c} {s}: expected a character or object identity, then a style "
              f"identity ({', '.join(n for n, k in kinds.items() if k == 'style')})", file=sys.stderr)
        return 2
    bad = [f"{name} {v}" for name, vals in (("--steps", args.steps), ("--ref-num", [args.ref_num]),
                                             ("--batches", [args.batches])) for v in vals if v < 1]
    if bad:
        print(f"lorarar_objective_probe: {', '.join(bad)}: expected a whole number >= 1", file=sys.stderr)
        return 2
    missing = [h for h in args.hypernet if not Path(h).is_file()]
    if missing:
        print(f"lorarar_objective_probe: no such hypernetwork file: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)
    probe(args)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from lorakit.errors import run_guarded

    sys.exit(run_guarded(main, "lorarar_objective_probe"))
