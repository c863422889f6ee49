"""Train the toy world v2 oracle: multi-label presence of every generic, class and identity concept (64x64).

Data: fresh renders (60% mixed scenes, where each class thing is its identity half the time, 40% class-world
scenes), labelled from the scene (an identity also shows its class). Augmentations make it read generated
images: the v2 VAE's round trip with noise on the latents (``--vae``), blur, pixel noise, brightness/contrast
jitter, shifts of up to 3 px. Evaluation renders NEW scenes (``--seed + 1000``) and reports per-concept accuracy
on clean and degraded (VAE + degradations) images, and for each identity its accuracy on the images that show its
class (telling ``kwibbit`` from other frogs). Everything goes to ``<out>/metrics.json``.

    python tools/train_oracle_v2.py --vae /work/shared_artifacts/toybase_v2/run/vae/toy-vae --out /tmp/oracle_v2
    python tools/train_oracle_v2.py --vae data/toy2-base/vae --init data/toy2-oracle --hard-negatives 150 \
        --steps 600 --out /tmp/oracle_v2_hn                                                     # fine-tune

``--hard-negatives K`` adds K hard negatives per identity (``lorakit.toyworld.v2.hardneg``: blobs in its colours,
its class with some of its parts, others in its colours), drawn from seed ``--seed + 20000``; their loss counts
only the column of the identity they imitate (a blue frog with kwibbit's spots is still a ``frog``), and they fill
``--hard-frac`` of each batch. ``--init`` continues from an oracle folder's weights.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from toy_oracle_training import (accuracy_recall, add_training_options, batch_indices, hard_negative_arrays, log,
                                 optimise, write_oracle)
from toy_oracle_training import degrade as _degrade
from toy_oracle_training import vae_roundtrip as _vae_roundtrip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--vae", help="v2 VAE folder (AutoencoderKL) for the round-trip augmentation")
    add_training_options(p, n_train=8000, n_eval=1000, n_vae=3000, steps=1500, batch=48)
    p.add_argument("--init", help="v2 oracle folder to start from (config.json + oracle.safetensors)")
    p.add_argument("--hard-negatives", type=int, default=0, help="hard negatives per identity (0: none)")
    p.add_argument("--hard-frac", type=float, default=0.25, help="share of each batch drawn from the hard negatives")
    p.add_argument("--window-views", type=int, default=0, metavar="K",
                   help="K two-character scenes whose per-character views (the regional benches' window and half "
                        "views) are added as positives of that character, labelled on identity and class columns only")
    p.add_argument("--extra-hard", nargs="+", default=[], metavar="IDENTITY=K",
                   help="K more hard negatives of these identities (seeds from --seed + 30000), for the look-alikes a "
                        "measurement still confuses")
    return p.parse_args(argv)


def render_hard_negatives(k: int, seed: int, concepts: list[str], names: list[str] | None = None):
    """``k`` hard negatives per identity (``names``, default all) -> images uint8 ``[N, 3, 64, 64]``, labels
    ``[N, C]`` (all 0) and a loss mask ``[N, C]`` that is 1 only in the imitated identity's column."""
    from lorakit.toyworld.v2.concepts import IDENTITIES
    from lorakit.toyworld.v2.hardneg import hard_negatives

    imgs, masks = hard_negative_arrays(hard_negatives, names or [c.name for c in IDENTITIES], k, seed, concepts)
    x = torch.from_numpy(np.ascontiguousarray(imgs.transpose(0, 3, 1, 2)))
    return x, torch.zeros(len(imgs), len(concepts)), torch.from_numpy(masks)


def render_character_views(n: int, seed: int, concepts: list[str]):
    """``n`` two-character scenes (two different character identities, one per half, on white) -> for each
    character its window view and its half view (what the regional benchmarks score) as images uint8
    ``[4n, 3, 64, 64]``, labels ``[4n, C]`` (its identity and class) and a loss mask ``[4n, C]`` on the identity
    and class columns only (the views' other content is not labelled)."""
    from lorakit.toyworld.regional_demo import character_views
    from lorakit.toyworld.sketch import render_character_scene
    from lorakit.toyworld.v2.composition import half_views
    from lorakit.toyworld.v2.concepts import CONCEPTS, IDENTITIES
    from lorakit.toyworld.v2.sketch import random_character_scene

    characters = [c.name for c in IDENTITIES if c.kind == "character"]
    scored = np.array([CONCEPTS[c].role in ("identity", "class") for c in concepts], np.float32)
    rng = np.random.default_rng(seed)
    imgs, labels, masks = [], [], []
    for _ in range(n):
        pair = tuple(rng.choice(characters, 2, replace=False))
        scene = random_character_scene(rng, pair)
        image, _ = render_character_scene(scene)
        for views in (character_views(image, scene), half_views(image)):
            for name, view in zip(pair, views):
                y = np.zeros(len(concepts), np.float32)
                y[[concepts.index(name), concepts.index(CONCEPTS[name].cls)]] = 1
                imgs.append(np.asarray(view.convert("RGB")))
                labels.append(y)
                masks.append(scored)
    x = torch.from_numpy(np.ascontiguousarray(np.stack(imgs).transpose(0, 3, 1, 2)))
    return x, torch.from_numpy(np.stack(labels)), torch.from_numpy(np.stack(masks))


def render_set(n: int, seed: int, concepts: list[str]):
    """``n`` scenes -> images uint8 ``[n, 3, 64, 64]`` and labels float ``[n, C]``."""
    from lorakit.toyworld.oracle import presence_labels
    from lorakit.toyworld.v2.render import render
    from lorakit.toyworld.v2.scenes import class_scene, mixed_scene

    rng = np.random.default_rng(seed)
    scenes = [mixed_scene(rng) if rng.random() < 0.6 else class_scene(rng) for _ in range(n)]
    imgs = np.stack([np.asarray(render(s)) for s in scenes]).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(imgs)), presence_labels(scenes, concepts)


def as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


def vae_roundtrip(vae, x: torch.Tensor, gen: torch.Generator, max_latent_noise: float = 0.35) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` through the VAE with noise (up to ``max_latent_noise`` x the latents' std) added to
    the latent mean, like the imperfect latents a sampler ends on -> uint8."""
    return (_vae_roundtrip(vae, as_float(x), gen, max_latent_noise) * 255).round().to(torch.uint8)


def degrade(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random blur (sigma 0.4-1.4, 7 taps) / colour jitter / pixel noise / shift (up to 3 px) of a float batch
    ``[B, 3, H, W]`` in [0, 1]."""
    return _degrade(x, gen, sigma=(0.4, 1.0), radius=3, max_shift=3)


def evaluate(net, x: torch.Tensor, y: torch.Tensor, concepts: list[str]) -> dict:
    """Per concept: accuracy, recall; for identities also the accuracy on images that show their class."""
    from lorakit.toyworld.v2.concepts import CONCEPTS

    pred, pos, out = accuracy_recall(net, x, y, concepts)
    for i, c in enumerate(concepts):
        cls = CONCEPTS[c].cls
        if cls:
            has_cls = pos[:, concepts.index(cls)]
            out[c]["vs_class_accuracy"] = round(float((pred[has_cls, i] == pos[has_cls, i]).float().mean()), 4)
            out[c]["vs_class_n"] = int(has_cls.sum())
    return out


def summarize(per: dict) -> dict:
    from lorakit.toyworld.v2.concepts import CONCEPTS

    def pick(role):
        return [k for k in per if CONCEPTS[k].role == role]

    ids = pick("identity")
    return {
        **{f"{role}_accuracy": round(float(np.mean([per[k]["accuracy"] for k in pick(role)])), 4)
           for role in ("generic", "class", "identity")},
        "identity_recall": round(float(np.mean([per[k]["recall"] for k in ids])), 4),
        "min_identity_vs_class_accuracy": min(per[k]["vs_class_accuracy"] for k in ids),
    }


def added_rows(args, concepts: list[str]):
    """The rows added to the plain renders, in order: ``(images, labels, loss mask, what)`` for the hard negatives,
    the character views and each ``--extra-hard`` identity's extra hard negatives."""
    from lorakit.toyworld.v2.concepts import IDENTITIES

    identities = [c.name for c in IDENTITIES]
    extra = []
    for spec in args.extra_hard:
        name, _, k = spec.partition("=")
        if name not in identities or not k.isdigit():
            raise SystemExit(f"--extra-hard {spec!r}: expected IDENTITY=K with an identity of {identities} and a count")
        extra.append((name, int(k)))
    if args.hard_negatives:
        yield (*render_hard_negatives(args.hard_negatives, args.seed + 20000, concepts), "hard negatives")
    if args.window_views:
        yield (*render_character_views(args.window_views, args.seed + 40000, concepts), "character views")
    for i, (name, k) in enumerate(extra):
        yield (*render_hard_negatives(k, args.seed + 30000 + 100 * i, concepts, [name]), f"more hard negatives of {name}")


def main(argv=None) -> int:
    from lorakit.toyworld.v2.concepts import CONCEPTS
    from lorakit.toyworld.v2.oracle import OracleNet

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    concepts = list(CONCEPTS)
    x, y = render_set(args.n_train, args.seed, concepts)
    xe, ye = render_set(args.n_eval, args.seed + 1000, concepts)
    log(f"rendered {len(x)} train + {len(xe)} eval scenes")
    gen = torch.Generator().manual_seed(args.seed)
    x_vae, xe_vae = x.clone(), xe
    if args.vae:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae, torch_dtype=torch.float32).eval()
        x_vae[: args.n_vae] = vae_roundtrip(vae, x[: args.n_vae], gen)
        xe_vae = vae_roundtrip(vae, xe, torch.Generator().manual_seed(args.seed + 1))
        log(f"VAE round trips done ({args.vae})")
    n_plain, mask = len(x), torch.ones_like(y)
    for xa, ya, ma, what in added_rows(args, concepts):  # sampled as --hard-frac of each batch
        xa_vae = vae_roundtrip(vae, xa, gen) if args.vae else xa
        x, x_vae, y, mask = torch.cat([x, xa]), torch.cat([x_vae, xa_vae]), torch.cat([y, ya]), torch.cat([mask, ma])
        log(f"{len(xa)} {what} added")
    net = OracleNet(len(concepts), args.width)
    if args.init:
        from lorakit.fileio import load_safetensors

        net.load_state_dict({k: v.float() for k, v in load_safetensors(Path(args.init) / "oracle.safetensors")[0].items()})
        log(f"starting from {args.init}")
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")

    def batch_loss(step):
        idx, use_vae = batch_indices(args.batch, args.hard_frac, len(x), n_plain, gen)
        xb = degrade(as_float(torch.where(use_vae, x_vae[idx], x[idx])), gen)
        m = mask[idx]
        return (loss_fn(net(xb), y[idx]) * m).sum() / m.sum()

    optimise(net, args.steps, args.lr, batch_loss, log_every=100)
    clean = evaluate(net, as_float(xe), ye, concepts)
    degraded = evaluate(net, degrade(as_float(xe_vae), torch.Generator().manual_seed(args.seed + 2)), ye, concepts)
    metrics = {"eval_scenes": args.n_eval, "clean": summarize(clean), "degraded": summarize(degraded),
               "per_concept_clean": clean, "per_concept_degraded": degraded, "vae_augmentation": bool(args.vae), "init": args.init,
               "hard_negatives_per_identity": args.hard_negatives,
               "train_seconds": round(time.time() - t0, 1), "args": vars(args)}
    out = Path(args.out)
    write_oracle(out, net, "toy-oracle-v2", {"world": "v2", "concepts": concepts, "width": args.width, "image_size": 64,
                                             "trained_by": "tools/train_oracle_v2.py", "args": vars(args)}, metrics)
    log(f"wrote {out} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
