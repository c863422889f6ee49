"""Train the toy ED-LoRA concepts into the shared cache, one chunk of steps per call (``lorakit.toyworld.edloras``).

    python tools/train_toy_edloras.py robot frog tophat mushroom --chunk-steps 100

Each call trains the first concept that is not cached yet up to its next multiple of ``--chunk-steps`` (and
more chunks while ``--hold-s`` allows) and exits: 0 when every concept named is cached (their paths printed),
3 when more chunks remain. So a shared
machine's job lock can be taken per chunk:

    until flock -w 1800 /work/heavy.lock python tools/train_toy_edloras.py robot frog --chunk-steps 100; \
        [ $? -ne 3 ]; do :; done
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorakit.threads import configure_threads

MORE = 3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("concepts", nargs="+", help="held-out characters or objects (robot, frog, tophat, ...)")
    ap.add_argument("--chunk-steps", type=int, default=0, help="steps per call (default 0: the whole run)")
    ap.add_argument("--hold-s", type=float, default=0,
                    help="after the first chunk, train further chunks in this call, each as many steps as still fit "
                         "in this many seconds since the start at the last chunk's speed (default 0: one chunk)")
    ap.add_argument("--cache", help="cache folder (default: lorakit.toyworld.loras.default_cache_dir())")
    args = ap.parse_args(argv)
    configure_threads()
    from lorakit.toyworld import edloras
    from lorakit.toyworld.loras import default_cache_dir

    concept_edlora_path, train_concept_edlora = edloras.concept_edlora_path, edloras.train_concept_edlora
    trained_steps = edloras.trained_steps

    cache = Path(args.cache) if args.cache else default_cache_dir()
    t0, rate = time.monotonic(), None  # seconds per step of the last chunk (model loading included)
    while todo := [c for c in args.concepts if not concept_edlora_path(c, cache).exists()]:
        fits = 0
        if rate is not None:
            fits = int((args.hold_s - (time.monotonic() - t0)) / rate) if args.hold_s else 0
            if fits < 10:
                print(f"{todo[0]}: not finished; call again to continue", flush=True)
                return MORE
        t, before = time.monotonic(), trained_steps(todo[0], cache)
        if fits and _max_steps(todo[0]) - before <= 1.1 * fits:  # a few steps short: finish rather than reload later
            fits = _max_steps(todo[0]) - before
        train_concept_edlora(todo[0], cache, chunk_steps=args.chunk_steps, max_new_steps=fits)
        finished = concept_edlora_path(todo[0], cache).exists()
        after = _max_steps(todo[0]) if finished else trained_steps(todo[0], cache)
        rate = (time.monotonic() - t) / max(1, after - before)
    for c in args.concepts:
        print(concept_edlora_path(c, cache), flush=True)
    return 0


def _max_steps(concept: str) -> int:
    from lorakit.resources import toy_recipe
    from lorakit.toyworld.edloras import RECIPE, edlora_overrides
    from lorakit.toyworld.loras import recipe_config

    return recipe_config(toy_recipe(RECIPE), edlora_overrides(concept), "edlora").max_steps


if __name__ == "__main__":
    sys.exit(main())
