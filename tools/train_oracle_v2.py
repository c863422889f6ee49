"""Train the toy world v2 oracle: multi-label presence of every generic, class and identity concept (64x64).

Data: fresh renders (60% mixed scenes, where each class thing is its identity half the time, 40% class-world
scenes), labelled from the scene (an identity also shows its class). Augmentations make it read generated
images: the v2 VAE's round trip with noise on the latents (``--vae``), blur, pixel noise, brightness/contrast
jitter, shifts of up to 3 px. Evaluation renders NEW scenes (``--seed + 1000``) and reports per-concept accuracy
on clean and degraded (VAE + degradations) images, and for each identity its accuracy on the images that show its
class (telling ``kwibbit`` from other frogs). Everything goes to ``<out>/metrics.json``.

    python tools/train_oracle_v2.py --vae /work/shared_artifacts/toybase_v2/run/vae/toy-vae --out /tmp/oracle_v2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--vae", help="v2 VAE folder (AutoencoderKL) for the round-trip augmentation")
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--n-eval", type=int, default=1000)
    p.add_argument("--n-vae", type=int, default=3000, help="train images that also get a VAE round-trip version")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


@torch.no_grad()
def vae_roundtrip(vae, x: torch.Tensor, gen: torch.Generator, max_latent_noise: float = 0.35) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` through the VAE with noise (up to ``max_latent_noise`` x the latents' std) added to
    the latent mean, like the imperfect latents a sampler ends on -> uint8."""
    out = []
    for i in range(0, len(x), 128):
        z = vae.encode(as_float(x[i : i + 128]) * 2 - 1).latent_dist.mean
        level = torch.rand(len(z), 1, 1, 1, generator=gen) * max_latent_noise
        z = z + level * z.std() * torch.randn(z.shape, generator=gen)
        out.append((((vae.decode(z).sample + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(out)


def degrade(x: torch.Tensor, gen: torch.Generator, max_shift: int = 3) -> torch.Tensor:
    """Random blur / colour jitter / pixel noise / shift of a float batch ``[B, 3, H, W]`` in [0, 1]."""
    f = torch.nn.functional
    b, _, h, w = x.shape
    blur = torch.rand(b, generator=gen) < 0.3
    if blur.any():
        sigma = float(0.4 + 1.0 * torch.rand((), generator=gen))
        k = torch.arange(-3, 4, dtype=torch.float32)
        kern = torch.exp(-(k**2) / (2 * sigma**2))
        kern = kern / kern.sum()
        xb = f.conv2d(f.pad(x[blur], (3, 3, 0, 0), mode="replicate"), kern.view(1, 1, 1, 7).repeat(3, 1, 1, 1), groups=3)
        xb = f.conv2d(f.pad(xb, (0, 0, 3, 3), mode="replicate"), kern.view(1, 1, 7, 1).repeat(3, 1, 1, 1), groups=3)
        x = x.clone()
        x[blur] = xb
    gain = 1 + 0.16 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    bias = 0.08 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    x = (x - 0.5) * gain + 0.5 + bias
    amp = 0.06 * torch.rand(b, 1, 1, 1, generator=gen) * (torch.rand(b, 1, 1, 1, generator=gen) < 0.5)
    x = x + amp * torch.randn(x.shape, generator=gen)
    s = max_shift
    dx, dy = (int(v) for v in torch.randint(-s, s + 1, (2,), generator=gen))
    x = f.pad(x, (s, s, s, s), mode="replicate")[:, :, s + dy : s + dy + h, s + dx : s + dx + w]
    return x.clamp(0, 1)


@torch.no_grad()
def evaluate(net, x: torch.Tensor, y: torch.Tensor, concepts: list[str]) -> dict:
    """Per concept: accuracy, recall; for identities also the accuracy on images that show their class."""
    from lorakit.toyworld.v2.concepts import CONCEPTS

    net.eval()
    p = torch.cat([torch.sigmoid(net(x[i : i + 256])) for i in range(0, len(x), 256)])
    net.train()
    pred, pos = p >= 0.5, y > 0.5
    out = {}
    for i, c in enumerate(concepts):
        row = {"accuracy": round(float((pred[:, i] == pos[:, i]).float().mean()), 4),
               "recall": round(float((pred[:, i] & pos[:, i]).sum()) / max(1, int(pos[:, i].sum())), 4)}
        cls = CONCEPTS[c].cls
        if cls:
            has_cls = pos[:, concepts.index(cls)]
            row["vs_class_accuracy"] = round(float((pred[has_cls, i] == pos[has_cls, i]).float().mean()), 4)
            row["vs_class_n"] = int(has_cls.sum())
        out[c] = row
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


def main(argv=None) -> int:
    from lorakit.fileio import save_safetensors, write_json
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
    net = OracleNet(len(concepts), args.width)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x), (args.batch,), generator=gen)
        use_vae = (torch.rand(args.batch, generator=gen) < 0.5).view(-1, 1, 1, 1)
        xb = degrade(as_float(torch.where(use_vae, x_vae[idx], x[idx])), gen)
        loss = loss_fn(net(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps:
            log(f"step {step}/{args.steps} loss {loss.item():.4f}")
    clean = evaluate(net, as_float(xe), ye, concepts)
    degraded = evaluate(net, degrade(as_float(xe_vae), torch.Generator().manual_seed(args.seed + 2)), ye, concepts)
    metrics = {"eval_scenes": args.n_eval, "clean": summarize(clean), "degraded": summarize(degraded),
               "per_concept_clean": clean, "per_concept_degraded": degraded, "vae_augmentation": bool(args.vae),
               "train_seconds": round(time.time() - t0, 1), "args": vars(args)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()},
                     out / "oracle.safetensors", {"lorakit.kind": "toy-oracle-v2"})
    write_json({"world": "v2", "concepts": concepts, "width": args.width, "image_size": 64,
                "trained_by": "tools/train_oracle_v2.py", "args": vars(args)}, out / "config.json")
    write_json(metrics, out / "metrics.json")
    log(json.dumps({"clean": metrics["clean"], "degraded": metrics["degraded"]}))
    log(f"wrote {out} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
