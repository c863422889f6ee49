"""Train a character or background identity's recipe LoRA on a whole-scene variant of its data: its 40 training
scenes drawn as the recipe draws them (``make_dataset(identity, n=40, seed=0)``, the same class scenes) but keeping
what the recipe takes out of them, so the captions name those things too:

* a background keeps the class scene's hat and mushroom (nocturo: 7 of 40 captions name a hat, 9 a mushroom);
* a character keeps the class scene's hat, mushroom and style (the recipe shows it alone, unstyled), as a real
  character LoRA's pictures show the character wearing and holding things, in other styles.

A probe of whether a LoRA that never saw the other things of a composition is what loses them there
(docs/toyworld.md):

    python tools/train_whole_scene_lora.py kwibbit --out artifacts/toy2_loras
    # then the benchmark on that LoRA: --lora-set kwibbit:data.path=<the folder this prints>
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("character", "background")


def variant_scenes(identity: str, n: int = 40, seed: int = 0) -> list:
    """The recipe's scenes of a character or background identity (the same draws as ``concept_scene``), with what
    the recipe drops kept: hats and mushrooms for a background; hats, mushrooms and the style for a character."""
    import numpy as np

    from lorakit.toyworld.v2.concepts import get_concept
    from lorakit.toyworld.v2.scenes import class_scene

    kind = get_concept(identity).kind
    rng, scenes = np.random.default_rng(seed), []
    while len(scenes) < n:
        base = class_scene(rng)
        if kind == "character":
            scenes.append(replace(base, shape=None, characters=(identity,), char_colors=()))
        elif base.characters or base.shape:
            scenes.append(replace(base, background=identity))
    return scenes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("identity", help="a character or background identity (kwibbit, zorbo, bloopo, nocturo, chekka)")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "toy2_loras"), help="LoRA cache folder")
    args = p.parse_args(argv)
    from lorakit.toyworld.v2.concepts import get_concept

    try:
        kind = get_concept(args.identity).kind
    except ValueError as err:
        print(f"train_whole_scene_lora: {err}", file=sys.stderr)
        return 2
    if kind not in KINDS:
        print(f"train_whole_scene_lora: {args.identity!r} is a {kind}, not a character or background identity",
              file=sys.stderr)
        return 2
    from lorakit.toyworld.dataset import write_scenes
    from lorakit.toyworld.v2.loras import ensure_rendered, train_identity_lora
    from lorakit.toyworld.v2.models import DEFAULT_BASE
    from lorakit.toyworld.v2.render import caption, render

    out = Path(args.out)
    suffix = "with-objects" if kind == "background" else "whole-scenes"  # the background's name as first published
    data = ensure_rendered((out / "toy2-data" / f"{args.identity}-{suffix}-n40-s0").resolve(),
                           lambda tmp: write_scenes(variant_scenes(args.identity), tmp, render, caption))
    lora = train_identity_lora(args.identity, out, DEFAULT_BASE, [f"data.path={data}"])
    print(f"data: {data}\nLoRA: {lora}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
