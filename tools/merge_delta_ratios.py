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


def delta(tensors: dict, up_key: str, cols: slice | None = None):
    """``up @ down * alpha / rank`` of one layer (``cols``: a slice of the rank, for one part of a merge)."""
    up, down = tensors[up_key].float(), tensors[up_key.replace("lora_up", "lora_down")].float()
    alpha_key = up_key.replace("lora_up.weight", "alpha")
    scale = float(tensors[alpha_key]) / up.shape[1] if alpha_key in tensors else 1.0
    if cols is not None:
        up, down = up[:, cols], down[cols]
    return (up @ down.flatten(1)) * scale


def ratios(content: dict, style: dict, merged: dict, layers=("to_q", "to_out")) -> dict:
    """``{"content": [...], "style": [...], "layers": [...]}``: per merged layer, the kept fraction of each part."""
    out = {"content": [], "style": [], "layers": []}
    for key in sorted(merged):
        if not key.endswith("lora_up.weight") or not any(n in key for n in layers):
            continue
        if key not in content or key not in style:
            continue
        r_c = content[key].shape[1]
        kept_c = delta(merged, key, slice(0, r_c)).norm() / delta(content, key).norm().clamp_min(1e-12)
        kept_s = delta(merged, key, slice(r_c, None)).norm() / delta(style, key).norm().clamp_min(1e-12)
        out["content"].append(float(kept_c))
        out["style"].append(float(kept_s))
        out["layers"].append(key.removesuffix(".lora_up.weight"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("content")
    p.add_argument("style")
    p.add_argument("merged")
    args = p.parse_args(argv)
    from lorakit.fileio import load_safetensors

    files = [load_safetensors(f)[0] for f in (args.content, args.style, args.merged)]
    r = ratios(*files)
    if not r["layers"]:
        print(f"merge_delta_ratios: {args.merged} re-weights no to_q / to_out layer that both LoRAs have",
              file=sys.stderr)
        return 2
    summary = {part: {"mean": round(sum(v) / len(v), 3), "min": round(min(v), 3), "max": round(max(v), 3)}
               for part, v in r.items() if part != "layers"}
    print(json.dumps({"merged": args.merged, "layers": len(r["layers"]), **summary}))
    return 0


if __name__ == "__main__":
    from lorakit.errors import run_guarded

    sys.exit(run_guarded(main, "merge_delta_ratios"))
