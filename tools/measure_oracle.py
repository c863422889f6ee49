"""How believable is the toy oracle? For every held-out concept: how often it calls hard negatives absent
(``lorakit.toyworld.hardneg``: blobs in the concept's colours, the concept with its telling parts left out, other
concepts in its colours) and how often it still finds the concept in fresh renders of it (recall), on clean
renders and through the toy VAE's round trip with latent noise (what generated images look like), at several
decision thresholds. Prints JSON lines; rates carry n and a 95% Wilson interval.

    python tools/measure_oracle.py --n 96 --seed 5000            # every held-out concept
    python tools/measure_oracle.py --concepts frog ink --oracle /tmp/oracle2
    python tools/measure_oracle.py --world v2 --n 96             # the v2 identities (lorakit.toyworld.v2.hardneg),
                                                                 # data/toy2-oracle, the VAE of data/toy2-base

Seeds: hard negatives and positives are drawn from ``--seed`` (train_oracle.py renders from 0 and 1000, and the
hard-negative fine-tune uses 0..; pass a seed none of them used).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", choices=("v1", "v2"), default="v1", help="toy world (default v1)")
    p.add_argument("--concepts", nargs="*", help="held-out concepts / v2 identities (default: all)")
    p.add_argument("--n", type=int, default=96, help="hard negatives and positives per concept (default 96)")
    p.add_argument("--seed", type=int, default=5000)
    p.add_argument("--oracle", help="oracle folder (default data/oracle; v2: data/toy2-oracle)")
    p.add_argument("--vae", help="VAE for the degraded copies (default data/toy-base/vae; v2: data/toy2-base/vae)")
    p.add_argument("--thresholds", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    return p.parse_args(argv)


def to_tensor(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i, np.float32) / 255 for i in images])).permute(0, 3, 1, 2)


def positives(concept: str, n: int, seed: int, world: str = "v1") -> torch.Tensor:
    """Fresh renders that show ``concept`` (its LoRA training scenes' form), ``[n, 3, S, S]``."""
    if world == "v2":
        from lorakit.toyworld.v2.render import render
        from lorakit.toyworld.v2.scenes import concept_scene
    else:
        from lorakit.toyworld.render import render
        from lorakit.toyworld.scenes import concept_scene

    rng = np.random.default_rng(seed)
    return to_tensor([render(concept_scene(concept, rng)) for _ in range(n)])


def _by_what(negs, absent) -> dict:
    """``{what (without its style suffix): "k/n absent"}``: which kind of hard negative the oracle gets wrong."""
    tally = {}
    for (_, _, what), a in zip(negs, absent):
        k = tally.setdefault(what.split(", ")[0], [0, 0])
        k[0] += int(a)
        k[1] += 1
    return {w: f"{a}/{n}" for w, (a, n) in sorted(tally.items())}


def main(argv=None) -> int:
    from diffusers import AutoencoderKL
    from toy_oracle_training import vae_roundtrip

    from lorakit.eval.stats import rate

    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.world == "v2":
        from lorakit.toyworld.v2.concepts import IDENTITIES as HELDOUT
        from lorakit.toyworld.v2.hardneg import FAMILIES, hard_negatives
        from lorakit.toyworld.v2.oracle import Oracle

        oracle = Oracle.load(args.oracle)
        vae_dir = args.vae or str(ROOT / "data" / "toy2-base" / "vae")
    else:
        from lorakit.toyworld.concepts import HELDOUT
        from lorakit.toyworld.hardneg import FAMILIES, hard_negatives
        from lorakit.toyworld.oracle import Oracle, load_oracle

        oracle = Oracle.load(args.oracle) if args.oracle else load_oracle()
        vae_dir = args.vae or str(ROOT / "data" / "toy-base" / "vae")
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).eval()
    concepts = args.concepts or [c.name for c in HELDOUT]
    totals = {}
    for ci, name in enumerate(concepts):
        seed = args.seed + 100 * ci
        negs = hard_negatives(name, args.n, seed=seed)
        fam = np.array([f for _, f, _ in negs])
        x_neg = to_tensor([im for im, _, _ in negs])
        x_pos = positives(name, args.n, seed + 1, args.world)
        col = oracle.concepts.index(name)
        for variant in ("clean", "vae"):
            gen = torch.Generator().manual_seed(seed + 2)
            xn = x_neg if variant == "clean" else vae_roundtrip(vae, x_neg, gen)
            xp = x_pos if variant == "clean" else vae_roundtrip(vae, x_pos, gen)
            pn = oracle.probabilities(xn)[:, col].numpy()
            pp = oracle.probabilities(xp)[:, col].numpy()
            for t in args.thresholds:
                absent = pn < t
                rec = {"world": args.world, "concept": name, "images": variant, "threshold": t,
                       "hard_negatives_absent": rate(int(absent.sum()), len(absent)),
                       "per_family_absent": {f: rate(int(absent[fam == f].sum()), int((fam == f).sum()))
                                             for f in FAMILIES},
                       "recall": rate(int((pp >= t).sum()), len(pp))}
                if t == 0.5:
                    worst = np.argsort(-pn)[:3]
                    rec["absent_by_what"] = _by_what(negs, absent)
                    rec["highest_scored"] = [{"what": negs[i][2], "p": round(float(pn[i]), 3)} for i in worst]
                print(json.dumps(rec), flush=True)
                tot = totals.setdefault((variant, t), [0, 0, 0, 0])
                tot[0] += int(absent.sum())
                tot[1] += len(absent)
                tot[2] += int((pp >= t).sum())
                tot[3] += len(pp)
    for (variant, t), (ka, na, kr, nr) in sorted(totals.items()):
        print(json.dumps({"concept": "all", "images": variant, "threshold": t,
                          "hard_negatives_absent": rate(ka, na), "recall": rate(kr, nr)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
