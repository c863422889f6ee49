"""What the toy oracle trainers share (``tools/train_oracle.py``, 32x32; ``tools/train_oracle_v2.py``, 64x64):
the augmentations that make an oracle read generated images (the VAE's round trip with noisy latents, blur,
colour jitter, pixel noise, shifts), the optimisation loop, per-concept accuracy and the files an oracle folder
holds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch


def add_training_options(p, *, n_train: int, n_eval: int, n_vae: int, steps: int, batch: int) -> None:
    """The options both oracle trainers take (their defaults differ)."""
    p.add_argument("--n-train", type=int, default=n_train)
    p.add_argument("--n-eval", type=int, default=n_eval)
    p.add_argument("--n-vae", type=int, default=n_vae, help="train images that also get a VAE round-trip version")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@torch.no_grad()
def vae_roundtrip(vae, x: torch.Tensor, gen: torch.Generator, max_latent_noise: float = 0.35) -> torch.Tensor:
    """Encode/decode ``x`` [N, 3, H, W] in [0, 1] through the VAE with noise (up to ``max_latent_noise`` x the
    latents' std) added to the latent mean, like the imperfect latents a diffusion sampler ends on."""
    out = []
    for i in range(0, len(x), 128):
        xb = x[i : i + 128] * 2 - 1
        z = vae.encode(xb).latent_dist.mean
        level = torch.rand(len(z), 1, 1, 1, generator=gen) * max_latent_noise
        z = z + level * z.std() * torch.randn(z.shape, generator=gen)
        out.append(((vae.decode(z).sample + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def degrade(x: torch.Tensor, gen: torch.Generator, sigma: tuple[float, float], radius: int,
            max_shift: int) -> torch.Tensor:
    """Random blur / colour jitter / pixel noise / shift of a float batch ``[B, 3, H, W]`` in [0, 1].

    ``sigma``: (lowest, span) of the Gaussian blur's sigma (one draw per batch, on ~30% of the images; kernel
    ``2 * radius + 1`` taps); shifts of up to ``max_shift`` px."""
    f = torch.nn.functional
    b, _, h, w = x.shape
    blur = torch.rand(b, generator=gen) < 0.3
    if blur.any():
        s = float(sigma[0] + sigma[1] * torch.rand((), generator=gen))
        k = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kern = torch.exp(-(k**2) / (2 * s**2))
        kern = kern / kern.sum()
        taps = 2 * radius + 1
        xb = f.conv2d(f.pad(x[blur], (radius, radius, 0, 0), mode="replicate"),
                      kern.view(1, 1, 1, taps).repeat(3, 1, 1, 1), groups=3)
        xb = f.conv2d(f.pad(xb, (0, 0, radius, radius), mode="replicate"),
                      kern.view(1, 1, taps, 1).repeat(3, 1, 1, 1), groups=3)
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


def hard_negative_arrays(generate, names: list[str], k: int, seed: int, concepts: list[str]):
    """``k`` hard negatives per name from ``generate(name, k, seed=...)`` (seed ``seed + 100 i`` for the i-th
    name) -> images uint8 ``[N, H, W, 3]`` and a loss mask ``[N, C]`` that is 1 only in the imitated concept's
    column of ``concepts``."""
    imgs, masks = [], []
    for i, name in enumerate(names):
        for im, _, _ in generate(name, k, seed=seed + 100 * i):
            imgs.append(np.asarray(im))
            m = np.zeros(len(concepts), np.float32)
            m[concepts.index(name)] = 1
            masks.append(m)
    return np.stack(imgs), np.stack(masks)


def batch_indices(batch: int, hard_frac: float, n_total: int, n_plain: int, gen: torch.Generator):
    """One batch's rows: ``round(batch * hard_frac)`` from the added rows ``[n_plain, n_total)`` (none when there
    are none), the rest from the plain rows; and for each, whether it is taken through the VAE (half on average).
    Returns ``(idx [batch], use_vae [batch, 1, 1, 1])``."""
    n_hard = round(batch * hard_frac) if n_total > n_plain else 0
    idx = torch.cat([torch.randint(0, n_plain, (batch - n_hard,), generator=gen),
                     torch.randint(n_plain, max(n_total, n_plain + 1), (n_hard,), generator=gen)])
    return idx, (torch.rand(batch, generator=gen) < 0.5).view(-1, 1, 1, 1)


def optimise(net, steps: int, lr: float, batch_loss, log_every: int) -> None:
    """``steps`` AdamW steps with a one-cycle schedule on ``batch_loss(step)`` (a scalar from a fresh batch)."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(1, steps + 1):
        loss = batch_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            log(f"step {step}/{steps} loss {loss.item():.4f}")


@torch.no_grad()
def accuracy_recall(net, x: torch.Tensor, y: torch.Tensor, concepts: list[str]):
    """(predictions, positives, ``{concept: {"accuracy", "recall"}}``) of ``net`` on ``x`` (threshold 0.5)."""
    net.eval()
    p = torch.cat([torch.sigmoid(net(x[i : i + 256])) for i in range(0, len(x), 256)])
    net.train()
    pred, pos = p >= 0.5, y > 0.5
    acc = (pred == pos).float().mean(0)
    out = {c: {"accuracy": round(float(acc[i]), 4),
               "recall": round((pred[:, i] & pos[:, i]).sum().item() / max(1, pos[:, i].sum().item()), 4)}
           for i, c in enumerate(concepts)}
    return pred, pos, out


def write_oracle(out: Path, net, kind: str, config: dict, metrics: dict) -> None:
    """An oracle folder: ``oracle.safetensors`` (``lorakit.kind`` = ``kind``), ``config.json``, ``metrics.json``."""
    from lorakit.fileio import save_safetensors, write_json

    out.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()},
                     out / "oracle.safetensors", {"lorakit.kind": kind})
    write_json(config, out / "config.json")
    write_json(metrics, out / "metrics.json")
    log(json.dumps({"clean": metrics["clean"], "degraded": metrics["degraded"]}))
