"""What each of CMLoRA's named options changes, on the toy world: final latents and UNet passes.

For one toy set (``--concepts``, kinds from the toy world, prompt = the toy caption, every LoRA at ``--scale``),
CMLoRA uncached, CMLoRA's defaults, Composite and every variant generate the final latents of ``--seeds``;
each JSON line gives the variant's mean and max absolute
difference from CMLoRA without any cache (``cmlora+cache=False``: the same weights and dominance, every pass
full), from the default and from Composite, plus its full / shallow pass counts and order. The staleness a cache rule
adds shows as its distance from the uncached run; an order's or a split's effect as its distance from the default.

Variants are ``tools/measure_composition_methods.py`` method specs (``cmlora+cache_refresh=dominant``,
``cmlora+cmlora_order=frequency`` profiles each LoRA alone first, without writing a profile cache).

    python tools/measure_cmlora_options.py --seeds 0 1 2 3 --steps 10
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

DEFAULT_VARIANTS = ["cmlora+cache_refresh=dominant", "cmlora+cache_refresh=age",
                    "cmlora+cache_layer=0", "cmlora+cmlora_order=frequency", "cmlora+cmlora_order=given",
                    "cmlora-official+cmlora_interval=2"]


def distance(a, b) -> list[float]:
    """Mean and max absolute difference of two latent batches."""
    return [round(float((a - b).abs().mean()), 4), round(float((a - b).abs().max()), 4)]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters-dir", default=str(ROOT / "artifacts" / "adapters"))
    ap.add_argument("--base", default=str(ROOT / "data" / "toy-base"))
    ap.add_argument("--concepts", nargs="+", default=["frog", "ink", "tophat", "starry"],
                    help="one toy concept per adapter (character, style, object, background)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--scale", type=float, default=0.8)
    ap.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS)
    return ap


def main() -> None:
    args = _parser().parse_args()

    import measure_composition_methods as mcm
    import torch

    from lorakit.logs import quiet_loaded_libraries
    from lorakit.sampling import (
        ProfileSettings,
        category_sequence,
        generate,
        load_adapters,
        load_pipeline,
        order_by_frequency,
        profile_adapters,
    )
    from lorakit.toyworld.concepts import get_concept
    from lorakit.toyworld.render import Scene, caption

    torch.set_num_threads(1)
    quiet_loaded_libraries()
    kinds = [get_concept(c).kind for c in args.concepts]
    by_kind = dict(zip(kinds, args.concepts))
    prompt = caption(Scene(characters=tuple(c for c, k in zip(args.concepts, kinds) if k == "character"),
                           objects=tuple(c for c, k in zip(args.concepts, kinds) if k == "object"),
                           style=by_kind.get("style"), background=by_kind.get("background", "plain")))
    files = [mcm.find_adapter(Path(args.adapters_dir), c) for c in args.concepts]
    pipe = load_pipeline(args.base, "fp32")
    ads = [replace(a, weight=args.scale) for a in load_adapters(pipe, files)]
    category, n_rot = category_sequence(kinds)

    def run(spec: str):
        st = mcm.method_settings(spec, args.steps, args.cfg)
        order, rot, how = category, n_rot, "category"
        if st.method == "cmlora" and st.cmlora_order == "frequency":
            prof = profile_adapters(pipe, ads, ProfileSettings(base=args.base, steps=args.steps, cfg=args.cfg),
                                    use_cache=False, progress=False)
            order, rot, how = order_by_frequency([prof[a.name]["score"] for a in ads])[0], len(ads), "frequency"
        elif st.method == "cmlora" and (st.cmlora_order == "given"):
            order, rot, how = list(range(len(ads))), len(ads), "given"
        st = replace(st, cmlora_order="auto")  # the order is passed explicitly
        lat, info = generate(pipe, ads, st, prompt, "", args.seeds, order=order, n_rotation=rot, output_type="latent")
        return lat, info, [args.concepts[i] for i in order], how

    base_runs = {spec: run(spec) for spec in ("cmlora+cache=False", "cmlora", "composite")}
    ref, default, composite = (base_runs[s][0] for s in ("cmlora+cache=False", "cmlora", "composite"))
    print(json.dumps({"prompt": prompt, "concepts": args.concepts, "kinds": kinds, "seeds": args.seeds,
                      "steps": args.steps, "files": [f.name for f in files],
                      "latent_abs_mean": round(float(ref.abs().mean()), 4)}), flush=True)
    for spec in [*base_runs, *(v for v in args.variants if v not in base_runs)]:
        lat, info, order, how = base_runs[spec] if spec in base_runs else run(spec)
        passes = info.get("passes", {})
        print(json.dumps({"variant": spec, "order": order, "order_by": how, "passes": passes.get("full"),
                          "shallow": passes.get("shallow"), "vs_uncached_mean_max": distance(lat, ref),
                          "vs_default_mean_max": distance(lat, default),
                          "vs_composite_mean_max": distance(lat, composite)}), flush=True)


if __name__ == "__main__":
    main()
