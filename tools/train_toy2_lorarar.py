"""Train a LoRA.rar hypernetwork on toy world v2's recipe LoRAs, one content + style pair held out.

Content LoRAs are the character and object identities (kwibbit, zorbo, bloopo, hattock, shroomel), style LoRAs the
style identities (inkvel, pixlor), each from its recipe (`train_configs/toy2_<identity>.yaml`, trained into
``--loras`` when missing) with its own 40 training renders as references. ``--holdout CONTENT STYLE`` leaves the
content identity out of training and scores that pair at the end (plain sum / untrained / trained ZipLoRA loss).
The recipe is `train_configs/toy_lorarar.yaml` on the v2 base, references at the base's 64 px; the file,
``toy2_lorarar-<content>-<style>-<hash>.safetensors``, is named by the held-out pair and a hash of the recipe, the
LoRAs' tensors and the references, and reused when it exists:

    python tools/train_toy2_lorarar.py --holdout zorbo inkvel --out artifacts/toy2_lorarar
    python tools/bench_composition.py --world v2 --methods merge lorarar ziplora --hypernet <the file it prints> \\
        --sizes 2 --sets n2-zorbo-inkvel --k 64 --out OUT
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from ci_artifacts import StageError, hypernet_config, train_hypernet_config

ROOT = Path(__file__).resolve().parents[1]


def identities_by_role() -> tuple[list[str], list[str]]:
    """(content identities: characters and objects, style identities), in the world's order."""
    from lorakit.toyworld.v2.concepts import IDENTITIES

    content = [c.name for c in IDENTITIES if c.kind in ("character", "object")]
    return content, [c.name for c in IDENTITIES if c.kind == "style"]


def recipe_entries(names: list[str], loras: Path, base: str) -> dict[str, dict]:
    """``{identity: {path, images}}``: each recipe LoRA (trained if missing) and its training renders."""
    from lorakit.toyworld.v2.loras import ensure_data, train_identity_lora

    return {n: {"path": str(train_identity_lora(n, loras, base)), "images": str(ensure_data(n, loras / "toy2-data")[0])}
            for n in names}


def file_prefix(content: str, style: str, overrides: list[str]) -> str:
    """``toy2_lorarar-<content>-<style>``, or with recipe overrides ``toy2_lorarar_set<8 hex>-<content>-<style>``:
    one file per held-out pair and recipe, so that no run clears another's file (each clears only older files of its
    own prefix)."""
    if not overrides:
        return f"toy2_lorarar-{content}-{style}"
    tag = hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:8]
    return f"toy2_lorarar_set{tag}-{content}-{style}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--holdout", nargs=2, metavar=("CONTENT", "STYLE"), required=True)
    p.add_argument("--loras", default=str(ROOT / "artifacts" / "toy2_loras"), help="the recipe LoRA cache")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "toy2_lorarar"), help="where the hypernetwork goes")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the LoRA.rar recipe")
    args = p.parse_args(argv)
    content, style = identities_by_role()
    c, s = args.holdout
    if c not in content or s not in style:
        print(f"train_toy2_lorarar: --holdout {c} {s}: expected a content identity ({', '.join(content)}) and a "
              f"style identity ({', '.join(style)})", file=sys.stderr)
        return 2
    from lorakit.toyworld.v2.models import DEFAULT_BASE

    base = str(DEFAULT_BASE)
    entries = recipe_entries(content + style, Path(args.loras), base)
    overrides = ["reference_size=0", *args.set]  # references at the base's own 64 px
    cfg = hypernet_config({}, overrides, None, base, entries={
        "content": [entries[n] for n in content if n != c], "style": [entries[n] for n in style],
        "eval_pairs": [[entries[c], entries[s]]]})
    try:
        target = train_hypernet_config(cfg, Path(args.out), prefix=file_prefix(c, s, args.set))
    except StageError as err:
        print(f"train_toy2_lorarar: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"hypernet": str(target), "holdout": [c, s]}))
    return 0


if __name__ == "__main__":
    from lorakit.errors import run_guarded

    sys.exit(run_guarded(main, "train_toy2_lorarar"))
