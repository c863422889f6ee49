"""Compare two toy world v2 LoRAs of one identity on the images a measurement already made, paired.

``tools/measure_toyworld.py --world v2 --image-store STORE`` keeps every image by prompt, seed and LoRA bytes.
This reads back both LoRAs' images of the same prompts and seeds (``presence``, ``leak_class``, ``leak_world``,
n each), scores them with the v2 oracle and prints one JSON line per row: both rates and the exact McNemar test
of A against B (``wins``: images where only A shows the identity). It generates nothing: a missing image is an
error naming the command that makes it.

    python tools/compare_toy2_loras.py nocturo LORA_A LORA_B --n 64 --image-store artifacts/toy2_loras/measure-images
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def stored_images(store: Path, base: str, adapter: str, scale: float, prompts: list[str]) -> list:
    """The images a measurement of ``adapter`` at ``scale`` kept for ``prompts`` (image ``i`` seeded
    ``IMAGE_SEED + i``); FileNotFoundError if one is missing."""
    from PIL import Image

    from lorakit.toyworld.evaluate import GUIDANCE, NUM_STEPS
    from lorakit.toyworld.v2.image_store import StoredPipe, pipeline_tag
    from lorakit.toyworld.v2.measure import IMAGE_SEED, SIZE

    keep = StoredPipe(None, store / pipeline_tag(base, adapter, scale))
    call = {"num_inference_steps": NUM_STEPS, "guidance_scale": GUIDANCE, "height": SIZE, "width": SIZE}
    out = []
    for i, p in enumerate(prompts):
        path = keep._path(p, IMAGE_SEED + i, call)
        if not path.exists():
            raise FileNotFoundError(f"no stored image of {adapter} for {p!r} (seed {IMAGE_SEED + i}) in {path.parent}:"
                                    f" measure it first (tools/measure_toyworld.py --world v2 --image-store {store})")
        out.append(Image.open(path).convert("RGB"))
    return out


def compare(identity: str, a: str, b: str, n: int, store: Path, base: str, oracle, scale: float = 0.8) -> list[dict]:
    from lorakit.eval.stats import paired, rate
    from lorakit.toyworld.v2.evaluate import identity_prompts, world_prompts
    from lorakit.toyworld.v2.measure import IDENTITY_PROMPT_SEED, WORLD_PROMPT_SEED

    triples = identity_prompts(identity, n, seed=IDENTITY_PROMPT_SEED)
    rows = {"presence": [t for t, _, _ in triples], "leak_class": [c for _, c, _ in triples],
            "leak_world": [p for p, _ in world_prompts(n, seed=WORLD_PROMPT_SEED)]}
    out = []
    for row, prompts in rows.items():
        fa, fb = ([bool(v) for v in oracle.score(stored_images(store, base, x, scale, prompts), [identity])
                   .present[:, 0]] for x in (a, b))
        out.append({"measure": "v2_lora_vs_lora", "identity": identity, "row": row, "n": n, "scale": scale,
                    "a": a, "b": b, "a_rate": rate(sum(fa), n), "b_rate": rate(sum(fb), n), "a_vs_b": paired(fa, fb)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("identity", help="a v2 identity (nocturo, inkvel, ...)")
    p.add_argument("a", help="LoRA A (.safetensors, as measured)")
    p.add_argument("b", help="LoRA B")
    p.add_argument("--n", type=int, default=64, help="images per row, as measured (default 64)")
    p.add_argument("--scale", type=float, default=0.8)
    p.add_argument("--image-store", required=True, help="measure_toyworld.py's --image-store folder")
    p.add_argument("--base", help="the v2 base (default: data/toy2-base)")
    p.add_argument("--oracle", help="the v2 oracle folder (default: data/toy2-oracle)")
    args = p.parse_args(argv)
    from lorakit.resources import data_path
    from lorakit.toyworld.v2.loras import identity_name
    from lorakit.toyworld.v2.oracle import Oracle

    identity = identity_name(args.identity)
    for x in (args.a, args.b):
        if not Path(x).is_file():
            raise FileNotFoundError(f"LoRA not found: {x}")
    base = args.base or str(data_path("toy2-base"))
    for row in compare(identity, args.a, args.b, args.n, Path(args.image_store), base, Oracle.load(args.oracle),
                       args.scale):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    from lorakit.errors import run_guarded

    raise SystemExit(run_guarded(main, "compare_toy2_loras"))
