"""How much of each LoRA a merged content + style LoRA keeps, layer by layer.

A ZipLoRA or LoRA.rar merge (``lorakit fuse --method ziplora / lorarar``) is an exact LoRA of rank r_c + r_s: the
content LoRA's factors, then the style's, each column scaled by its merge coefficient. For every layer the merge
re-weights (to_q / to_out.0 by default), this prints ||delta of the merge's content part|| / ||content LoRA's
delta|| and the same for the style (1.0: kept as it was), as one JSON line: mean, min, max over the layers.

    python tools/merge_delta_ratios.py CONTENT.safetensors STYLE.safetensors MERGED.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys


def part(merged, cols: slice):
    """The rank columns ``cols`` of a merged layer (a :class:`lorakit.adapters.lora.LoraModule`) as a LoRA at the
    merge's own scale."""
    from lorakit.adapters.lora import LoraModule

    down, up = merged.down[cols], merged.up[:, cols]
    return LoraModule(down=down, up=up, alpha=merged.scale * down.shape[0])


def ratios(content, style, merged, layers=("to_q", "to_out")) -> dict:
    """``{"content": [...], "style": [...], "layers": [...]}`` for three :class:`lorakit.adapters.io.Adapter`:
    per layer the merge re-weights, the kept fraction of each part's delta."""
    out = {"content": [], "style": [], "layers": []}
    for name in sorted(merged.modules):
        if not any(n in name for n in layers) or name not in content.modules or name not in style.modules:
            continue
        c, s, m = (a.modules[name].to_lora() for a in (content, style, merged))
        kept_c = part(m, slice(0, c.rank)).delta().norm() / c.delta().norm().clamp_min(1e-12)
        kept_s = part(m, slice(c.rank, None)).delta().norm() / s.delta().norm().clamp_min(1e-12)
        out["content"].append(float(kept_c))
        out["style"].append(float(kept_s))
        out["layers"].append(name)
    return out


def summary(r: dict) -> dict:
    """``{"content": {"mean", "min", "max"}, "style": {...}}`` of :func:`ratios`' per-layer fractions (3 decimals)."""
    return {part: {"mean": round(sum(v) / len(v), 3), "min": round(min(v), 3), "max": round(max(v), 3)}
            for part, v in r.items() if part != "layers"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("content")
    p.add_argument("style")
    p.add_argument("merged")
    args = p.parse_args(argv)
    from lorakit.adapters.io import load_adapter

    r = ratios(*(load_adapter(f) for f in (args.content, args.style, args.merged)))
    if not r["layers"]:
        print(f"merge_delta_ratios: {args.merged} re-weights no to_q / to_out layer that both LoRAs have",
              file=sys.stderr)
        return 2
    print(json.dumps({"merged": args.merged, "layers": len(r["layers"]), **summary(r)}))
    return 0


if __name__ == "__main__":
    from lorakit.errors import run_guarded

    sys.exit(run_guarded(main, "merge_delta_ratios"))
