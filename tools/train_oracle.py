"""Train the toy-world oracle (``data/oracle``): multi-label presence of every generic and held-out concept.

Data: mixed scenes (characters, objects, styles, held-out and generic backgrounds, generic shapes) and generic
scenes, rendered fresh from ``--seed``. Augmentations make it read generated images: the toy VAE's round trip
with noise added to the latents (``--vae``), Gaussian blur, pixel noise, brightness/contrast jitter, 1-2 px
shifts. Evaluation renders NEW scenes (another seed) and reports per-concept accuracy on clean and degraded
images; the numbers go to ``<out>/metrics.json``.

    python tools/train_oracle.py --vae /tmp/toybase/vae/toy-vae --out data/oracle
    python tools/train_oracle.py --init data/oracle --hard-negatives 200 --steps 800 --out /tmp/oracle2   # fine-tune

``--hard-negatives K`` adds K hard negatives per held-out concept (``lorakit.toyworld.hardneg``: blobs in its
colours, its parts without the telling ones, other concepts in its colours), drawn from seed ``--seed + 20000``;
their loss counts only the column of the concept they imitate (whether a robot in the frog's greens is a "robot"
is left open). ``--init`` continues from an oracle folder's weights.

``--generated OUT LABELS`` adds generated images a person labelled (``tools/oracle_generated.py make`` wrote
``OUT``; ``LABELS`` is the JSON of 0/1 verdicts): only the even-indexed ones, so the odd-indexed half stays a
held-out check (``tools/oracle_generated.py score --half odd``). Like hard negatives, their loss counts only the
labelled concept's column, and they are drawn into the hard share of each batch (``--hard-frac``), without the
VAE round trip (they already are decoded images).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from toy_oracle_training import (accuracy_recall, add_training_options, batch_indices, hard_negative_arrays, log,
                                 optimise, vae_roundtrip, write_oracle)
from toy_oracle_training import degrade as _degrade


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/oracle")
    p.add_argument("--vae", help="toy VAE folder (AutoencoderKL) for round-trip augmentation; default data/toy-base/vae")
    add_training_options(p, n_train=12000, n_eval=2000, n_vae=2500, steps=2500, batch=64)
    p.add_argument("--init", help="oracle folder to start from (config.json + oracle.safetensors)")
    p.add_argument("--hard-negatives", type=int, default=0, help="hard negatives per held-out concept (0: none)")
    p.add_argument("--hard-frac", type=float, default=0.25, help="share of each batch drawn from the hard negatives")
    p.add_argument("--generated", nargs=2, action="append", default=[], metavar=("OUT", "LABELS"),
                   help="person-labelled generated images (even indices only; repeatable)")
    return p.parse_args(argv)


def render_set(n: int, seed: int, concepts: list[str]):
    """n scenes (75% mixed, 25% generic) -> images float [n, 3, 32, 32] in [0, 1], labels float [n, C]."""
    from lorakit.toyworld.oracle import presence_labels
    from lorakit.toyworld.render import render
    from lorakit.toyworld.scenes import generic_scene, mixed_scene

    rng = np.random.default_rng(seed)
    scenes = [mixed_scene(rng) if rng.random() < 0.75 else generic_scene(rng) for _ in range(n)]
    imgs = np.stack([np.asarray(render(s)) for s in scenes])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0, presence_labels(scenes, concepts)


def render_hard_negatives(k: int, seed: int, concepts: list[str]):
    """``k`` hard negatives per held-out concept -> images ``[N, 3, 32, 32]``, labels ``[N, C]`` (all 0) and a
    loss mask ``[N, C]`` that is 1 only in the imitated concept's column."""
    from lorakit.toyworld.concepts import HELDOUT
    from lorakit.toyworld.hardneg import hard_negatives

    imgs, masks = hard_negative_arrays(hard_negatives, [c.name for c in HELDOUT], k, seed, concepts)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    return x, torch.zeros(len(imgs), len(concepts)), torch.from_numpy(masks)


def load_generated(pairs: list[tuple[str, str]], concepts: list[str]):
    """Even-indexed person-labelled generated images of each ``(OUT, LABELS)`` -> images ``[N, 3, 32, 32]``,
    labels ``[N, C]`` (the person's verdict in the labelled concept's column) and a loss mask of that column."""
    from PIL import Image

    imgs, labels, masks = [], [], []
    for out, labels_file in pairs:
        meta = json.loads((Path(out) / "images.json").read_text())
        verdicts = json.loads(Path(labels_file).read_text())
        verdicts = verdicts["labels"] if isinstance(verdicts, dict) else verdicts
        col = concepts.index(meta["concept"])
        for i, rec in enumerate(meta["images"][::2]):
            imgs.append(np.asarray(Image.open(Path(out) / rec["file"]).convert("RGB").resize((32, 32))))
            y, m = np.zeros(len(concepts), np.float32), np.zeros(len(concepts), np.float32)
            y[col], m[col] = float(verdicts[2 * i]), 1.0
            labels.append(y)
            masks.append(m)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
    return x, torch.from_numpy(np.stack(labels)), torch.from_numpy(np.stack(masks))


def degrade(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random blur (sigma 0.3-1.0, 5 taps) / noise / colour jitter / shift (up to 2 px) of a batch [B,3,32,32]."""
    return _degrade(x, gen, sigma=(0.3, 0.7), radius=2, max_shift=2)


def evaluate(net, x, y, concepts):
    return accuracy_recall(net, x, y, concepts)[2]


def summarize(per: dict, heldout: set[str]) -> dict:
    def mean(keys, field):
        return round(float(np.mean([per[k][field] for k in keys])), 4)

    h = [k for k in per if k in heldout]
    g = [k for k in per if k not in heldout]
    return {"heldout_accuracy": mean(h, "accuracy"), "heldout_recall": mean(h, "recall"),
            "generic_accuracy": mean(g, "accuracy"), "generic_recall": mean(g, "recall"),
            "min_heldout_accuracy": min(per[k]["accuracy"] for k in h)}


def main(argv=None) -> int:
    from lorakit.toyworld.concepts import GENERIC, HELDOUT
    from lorakit.toyworld.oracle import OracleNet

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    concepts = [c.name for c in GENERIC + HELDOUT]
    heldout = {c.name for c in HELDOUT}
    gen = torch.Generator().manual_seed(args.seed)
    data = _training_data(args, concepts, gen)
    net = OracleNet(len(concepts), args.width)
    if args.init:
        from lorakit.fileio import load_safetensors

        net.load_state_dict({k: v.float() for k, v in load_safetensors(Path(args.init) / "oracle.safetensors")[0].items()})
        log(f"starting from {args.init}")
    _train(args, net, data, gen)
    clean = evaluate(net, data["xe"], data["ye"], concepts)
    degraded = evaluate(net, degrade(data["xe_vae"], torch.Generator().manual_seed(args.seed + 2)), data["ye"], concepts)
    metrics = {
        "eval_scenes": args.n_eval, "clean": summarize(clean, heldout), "degraded": summarize(degraded, heldout),
        "per_concept_clean": clean, "per_concept_degraded": degraded,
        "train_seconds": round(time.time() - t0, 1), "steps": args.steps, "batch": args.batch,
        "vae_augmentation": data["vae"] is not None, "threads": args.threads,
        "init": args.init, "hard_negatives_per_concept": args.hard_negatives, "train_scenes": data["n_plain"],
        "generated": [list(g) for g in args.generated],
    }
    _write(args, net, concepts, heldout, metrics)
    log(f"wrote {args.out} in {time.time() - t0:.0f} s")
    return 0


def _training_data(args, concepts: list[str], gen: torch.Generator) -> dict:
    """Rendered train / eval scenes, their VAE round trips (when a VAE is there), plus hard negatives and
    person-labelled generated images; ``mask`` weighs each label (0: unknown)."""
    x, y = render_set(args.n_train, args.seed, concepts)
    xe, ye = render_set(args.n_eval, args.seed + 1000, concepts)
    log(f"rendered {len(x)} train + {len(xe)} eval scenes")
    vae = None
    vae_path = args.vae or "data/toy-base/vae"
    if Path(vae_path).exists():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch.float32).eval()
        x_vae = x.clone()
        x_vae[: args.n_vae] = vae_roundtrip(vae, x[: args.n_vae], gen)
        xe_vae = vae_roundtrip(vae, xe, torch.Generator().manual_seed(args.seed + 1))
        log(f"VAE round trips done ({vae_path})")
    else:
        log(f"no VAE at {vae_path}: training without the VAE round-trip augmentation")
        x_vae, xe_vae = x, xe
    n_plain = len(x)
    mask = torch.ones_like(y)
    if args.hard_negatives:
        xh, yh, mh = render_hard_negatives(args.hard_negatives, args.seed + 20000, concepts)
        xh_vae = vae_roundtrip(vae, xh, gen) if vae is not None else xh
        x, x_vae, y, mask = torch.cat([x, xh]), torch.cat([x_vae, xh_vae]), torch.cat([y, yh]), torch.cat([mask, mh])
        log(f"{len(xh)} hard negatives added")
    if args.generated:
        xg, yg, mg = load_generated(args.generated, concepts)
        x, x_vae, y, mask = torch.cat([x, xg]), torch.cat([x_vae, xg]), torch.cat([y, yg]), torch.cat([mask, mg])
        log(f"{len(xg)} person-labelled generated images added (even indices)")
    return {"x": x, "x_vae": x_vae, "y": y, "mask": mask, "n_plain": n_plain, "xe": xe, "ye": ye, "xe_vae": xe_vae,
            "vae": vae}


def _train(args, net, data: dict, gen: torch.Generator) -> None:
    """``--steps`` AdamW steps (one-cycle schedule) on masked BCE; a share ``--hard-frac`` of each batch from the
    added images, half of each batch through the VAE, every image degraded."""
    x, x_vae, y, mask, n_plain = data["x"], data["x_vae"], data["y"], data["mask"], data["n_plain"]
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")

    def batch_loss(step):
        idx, use_vae = batch_indices(args.batch, args.hard_frac, len(x), n_plain, gen)
        xb = torch.where(use_vae, x_vae[idx], x[idx])
        xb = degrade(xb, gen)
        m = mask[idx]
        return (loss_fn(net(xb), y[idx]) * m).sum() / m.sum()

    optimise(net, args.steps, args.lr, batch_loss, log_every=250)


def _write(args, net, concepts: list[str], heldout: set[str], metrics: dict) -> None:
    write_oracle(Path(args.out), net, "toy-oracle", {
        "concepts": concepts, "heldout": sorted(heldout), "width": args.width, "image_size": 32,
        "trained_by": "tools/train_oracle.py", "args": vars(args)}, metrics)


if __name__ == "__main__":
    raise SystemExit(main())
