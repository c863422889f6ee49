"""Write DreamBooth-style prior images for a toy world v2 identity: scenes of the kind the identity's LoRA is
trained on (another seed) with the identity replaced by its class, captioned the same way.

DreamBooth regularises ``sks dog`` with images of other dogs; here inkvel's prior images are the same kind of
scenes in the plain ``outline`` style, kwibbit's show other frogs (a random class colour). Pass the folder to a
recipe as ``data.reg_path``:

    python tools/make_class_prior_v2.py inkvel /tmp/inkvel-prior --n 40 --seed 2
    python tools/train_toy2_loras.py --out LORAS --identities inkvel --set data.reg_path=/tmp/inkvel-prior
    python tools/measure_toyworld.py --world v2 --concepts inkvel --set data.reg_path=/tmp/inkvel-prior --work LORAS

``--source base`` draws the images with the base model instead of the renderer (DreamBooth's own prior
preservation: the LoRA is then trained to leave the base's class images as they are, not to redraw the class
the way the renderer does), seeded from ``--image-seed``, 20 DDIM steps, guidance 4 (the measurements'):

    python tools/make_class_prior_v2.py inkvel /tmp/inkvel-prior-base --source base

Same arguments -> byte-identical files (the base's images: on one machine and torch build). Exit status 2 for a
name that is not a v2 identity.
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
    p.add_argument("--source", choices=("render", "base"), default="render",
                   help="who draws the images: the renderer (default) or the base model (DreamBooth's prior)")
    p.add_argument("--base", help="--source base: the v2 pipeline (default: the bundled data/toy2-base)")
    p.add_argument("--image-seed", type=int, default=5000,
                   help="--source base: image i is seeded by image-seed + i (default 5000, apart from the "
                   "measurements' 1000 + i)")
    args = p.parse_args(argv)
    identity = identity_name(args.identity)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    rng = np.random.default_rng(args.seed)
    scenes = [class_prior_scene(identity, rng) for _ in range(args.n)]
    draw = render if args.source == "render" else base_drawer(scenes, args.base, args.image_seed)
    write_scenes(scenes, args.out, draw, caption)
    print(f"{args.n} prior images of {get_concept(identity).cls} (for {identity}, drawn by the {args.source}) "
          f"in {args.out}")
    return 0


def base_drawer(scenes: list[Scene], base: str | None, image_seed: int):
    """``draw(scene)`` for :func:`write_scenes`: the base's image of each scene's caption, generated up front."""
    from lorakit.toyworld.evaluate import GUIDANCE, NUM_STEPS, generate
    from lorakit.toyworld.v2.measure import SIZE, load_pipeline
    from lorakit.toyworld.v2.models import DEFAULT_BASE

    pipe = load_pipeline(base or DEFAULT_BASE)
    images = generate(pipe, [caption(s) for s in scenes], seed=image_seed, steps=NUM_STEPS, guidance=GUIDANCE,
                      height=SIZE, width=SIZE)
    by_scene = {id(s): im for s, im in zip(scenes, images)}
    return lambda scene: by_scene[id(scene)]


if __name__ == "__main__":
    from lorakit.errors import run_guarded

    raise SystemExit(run_guarded(main, "make_class_prior_v2"))
