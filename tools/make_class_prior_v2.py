"""Write DreamBooth-style prior images for a toy world v2 identity: scenes of the kind the identity's LoRA is
trained on (another seed) with the identity replaced by its class, captioned the same way.

DreamBooth regularises ``sks dog`` with images of other dogs; here inkvel's prior images are the same kind of
scenes in the plain ``outline`` style, kwibbit's show other frogs (a random class colour). Pass the folder to a
recipe as ``data.reg_path``:

    python tools/make_class_prior_v2.py inkvel /tmp/inkvel-prior --n 40 --seed 2
    python tools/train_toy2_loras.py --out LORAS --identities inkvel --set data.reg_path=/tmp/inkvel-prior
    python tools/measure_toyworld.py --world v2 --concepts inkvel --set data.reg_path=/tmp/inkvel-prior --work LORAS

Same arguments -> byte-identical files. Exit status 2 for a name that is not a v2 identity.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from lorakit.toyworld.dataset import write_scenes
from lorakit.toyworld.v2.concepts import SHAPE_COLORS, get_concept
from lorakit.toyworld.v2.loras import identity_name
from lorakit.toyworld.v2.render import Scene, caption, render
from lorakit.toyworld.v2.scenes import concept_scene


def class_prior_scene(identity: str, rng: np.random.Generator) -> Scene:
    """One of ``identity``'s training-kind scenes with every occurrence of the identity replaced by its class."""
    cls = get_concept(identity).cls
    scene = concept_scene(identity, rng)
    changes = {}
    for f in dataclasses.fields(scene):
        value = getattr(scene, f.name)
        if value == identity:
            changes[f.name] = cls
        elif isinstance(value, tuple) and identity in value:
            changes[f.name] = tuple(cls if v == identity else v for v in value)
    if "characters" in changes:
        changes["char_colors"] = tuple(str(rng.choice(list(SHAPE_COLORS))) for _ in changes["characters"])
    return dataclasses.replace(scene, **changes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("identity", help="a v2 identity (kwibbit, inkvel, ...)")
    p.add_argument("out", help="the folder to write (PNG + caption .txt per image)")
    p.add_argument("--n", type=int, default=40, help="images (default 40, as the recipes' regularisation folders)")
    p.add_argument("--seed", type=int, default=2, help="scene seed (default 2: the recipes' data use 0 and 1)")
    args = p.parse_args(argv)
    identity = identity_name(args.identity)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    rng = np.random.default_rng(args.seed)
    write_scenes([class_prior_scene(identity, rng) for _ in range(args.n)], args.out, render, caption)
    print(f"{args.n} prior images of {get_concept(identity).cls} (for {identity}) in {args.out}")
    return 0


if __name__ == "__main__":
    from lorakit.errors import run_guarded

    raise SystemExit(run_guarded(main, "make_class_prior_v2"))
