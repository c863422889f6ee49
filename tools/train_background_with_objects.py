"""Train a background identity's recipe LoRA on a data variant: its 40 training scenes as the recipe renders them
(``make_dataset(identity, n=40, seed=0)``) but keeping the hats and mushrooms of the class scenes they start
from, so its captions name objects too (nocturo: 7 of 40 name a hat, 9 a mushroom). A probe of whether a
background LoRA that never saw a hat is what loses the hat in composition (docs/toyworld.md).

    python tools/train_background_with_objects.py nocturo --out artifacts/toy2_loras
    # then the benchmark on that LoRA: --lora-set nocturo:data.path=<the folder this prints>
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def variant_scenes(identity: str, n: int = 40, seed: int = 0) -> list:
    """The recipe's scenes of a background identity (the same draws as ``concept_scene``), objects kept."""
    import numpy as np

    from lorakit.toyworld.v2.scenes import class_scene

    rng, scenes = np.random.default_rng(seed), []
    while len(scenes) < n:
        base = class_scene(rng)
        if base.characters or base.shape:
            scenes.append(replace(base, background=identity))
    return scenes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("identity", help="a background identity (nocturo, chekka)")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "toy2_loras"), help="LoRA cache folder")
    args = p.parse_args(argv)
    from lorakit.toyworld.v2.concepts import get_concept

    try:
        kind = get_concept(args.identity).kind
    except ValueError as err:
        print(f"train_background_with_objects: {err}", file=sys.stderr)
        return 2
    if kind != "background":
        print(f"train_background_with_objects: {args.identity!r} is a {kind}, not a background identity",
              file=sys.stderr)
        return 2
    from lorakit.toyworld.dataset import write_scenes
    from lorakit.toyworld.loras import train_recipe_lora
    from lorakit.toyworld.v2.loras import ensure_data, recipe_path
    from lorakit.toyworld.v2.models import DEFAULT_BASE
    from lorakit.toyworld.v2.render import caption, render

    out = Path(args.out)
    data = (out / "toy2-data" / f"{args.identity}-with-objects-n40-s0").resolve()
    if not data.is_dir():
        write_scenes(variant_scenes(args.identity), data, render, caption)
    _, reg = ensure_data(args.identity, out / "toy2-data")
    lora = train_recipe_lora(recipe_path(args.identity), f"toy2_{args.identity}", out,
                             [f"base_model={DEFAULT_BASE}", f"data.path={data}", f"data.reg_path={reg}"])
    print(f"data: {data}\nLoRA: {lora}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
