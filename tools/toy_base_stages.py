"""The stages both toy base trainers share (``tools/train_toy_base.py``, 32x32; ``tools/train_toy_base_v2.py``,
64x64): rendered scenes on disk, the TrainLoop settings, the VAE's loss, the latents' posterior statistics, the
UNet's captions and its epsilon loss with Min-SNR-5 weighting. Each trainer keeps what differs (its scenes, EMA
and checkpoint layout)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare_run(args) -> Path:
    """Torch threads, offline hub, and the ``--work`` folder (made when missing)."""
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    return work


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


# ------------------------------------------------------------------------------------------------ 1. render


def render_once(work: Path, seed: int, kinds: list[tuple], world, count_key: str) -> Path:
    """``<work>/data.npz`` and ``<work>/captions.json``: the scenes of ``kinds`` (``[(draw(rng), count)]``, in
    order, from one generator seeded with ``seed``) drawn by ``world.render`` and captioned by ``world.caption``;
    ``count_key`` holds the first kind's count (the scenes the UNet trains on). Kept when it is there already."""
    from lorakit.fileio import write_json

    out = work / "data.npz"
    if out.exists():
        return out
    t0 = time.time()
    rng = np.random.default_rng(seed)
    scenes = [draw(rng) for draw, n in kinds for _ in range(n)]
    images = np.stack([np.asarray(world.render(s)) for s in scenes])
    write_json([world.caption(s) for s in scenes], work / "captions.json")
    tmp = work / "data.tmp.npz"
    np.savez(tmp, images=images, **{count_key: kinds[0][1]})
    os.replace(tmp, out)
    log(f"rendered {len(scenes)} scenes in {time.time() - t0:.0f} s -> {out}")
    return out


def load_rendered(work: Path, count_key: str):
    """(images uint8 [N, H, W, 3], the UNet's scene count, captions) of :func:`render_once`."""
    d = np.load(work / "data.npz")
    return d["images"], int(d[count_key]), json.loads((work / "captions.json").read_text())


# ------------------------------------------------------------------------------------------------ 2. vae


def train_config(work: Path, name: str, steps: int, batch: int, lr: float, seed: int, *, warmup: int,
                 save_every: int, checkpoint_every: int, keep_checkpoints: int):
    """The TrainLoop settings of a stage in ``<work>/<name>`` (constant learning rate after ``warmup`` steps,
    resumed from the latest checkpoint)."""
    from omegaconf import OmegaConf

    from lorakit.training.loop import TrainConfig

    return OmegaConf.structured(TrainConfig(
        output_dir=str(work / name), output_name=f"toy-{name}", max_steps=steps, train_batch_size=batch,
        learning_rate=lr, lr_scheduler="constant_with_warmup", lr_warmup_steps=warmup, adam_weight_decay=0.0,
        max_grad_norm=1.0, checkpointing_steps=checkpoint_every, checkpoints_total_limit=keep_checkpoints,
        save_every=save_every, logging="none", seed=seed, resume="latest",
    ))


def train_autoencoder(vae, cfg, data):
    """The VAE stage: L1 reconstruction + 1e-6 KL with lorakit's TrainLoop; returns its result."""
    from lorakit.training.loop import TrainLoop, build_optimizer, make_accelerator

    acc = make_accelerator(cfg)
    opt = build_optimizer(cfg, [{"params": list(vae.parameters())}])

    def compute_loss(b, step, models):
        post = models[0].encode(b["image"]).latent_dist
        rec = models[0].decode(post.sample()).sample
        return (rec - b["image"]).abs().mean() + 1e-6 * post.kl().mean()

    def save(path):
        acc.unwrap_model(vae).save_pretrained(path)

    # resume=latest: continues an interrupted stage; a finished one resumes at its last step and trains 0 steps
    return TrainLoop(cfg, acc, [vae], opt, data, compute_loss, save, artifact_suffix="").run()


# ------------------------------------------------------------------------------------------------ 3. latents


@torch.no_grad()
def posterior_stats(vae, images: np.ndarray, n: int):
    """Posterior means and stds of the first ``n`` images (in chunks of 256) and ``scaling_factor`` =
    1 / std(means)."""
    means, stds = [], []
    for i in range(0, n, 256):
        d = vae.encode(to_tensor(images[i : min(i + 256, n)])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    mean, std = torch.cat(means), torch.cat(stds)
    scale = 1.0 / float(mean.std())
    log(f"encoded {len(mean)} latents {tuple(mean.shape[1:])}, scaling_factor {scale:.4f}")
    return mean, std, scale


def continued_vae(pipeline: str):
    """``--init-from``: the trained pipeline's VAE and the latent scale its UNet learned at."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(pipeline) / "vae")
    return vae, float(vae.config.scaling_factor)


# ------------------------------------------------------------------------------------------------ 4. unet


def unet_start(pipe, captions: list[str], init_from: str | None):
    """The UNet stage's start: ``pipe`` with ``--init-from``'s UNet and text encoder when given, each scene's
    caption id and the text encoder's output for every distinct caption (id 0: the empty caption)."""
    vocab = [""] + sorted(set(captions))
    index = {c: i for i, c in enumerate(vocab)}
    ids = [index[c] for c in captions]
    if init_from:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        pipe.unet = UNet2DConditionModel.from_pretrained(Path(init_from) / "unet")
        pipe.text_encoder = CLIPTextModel.from_pretrained(Path(init_from) / "text_encoder")
        log(f"UNet and text encoder start from {init_from}")
    pipe.text_encoder.requires_grad_(False)
    with torch.no_grad():
        tok = pipe.tokenizer(vocab, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        text = pipe.text_encoder(tok.input_ids)[0]  # [n_captions, 77, width]
    return ids, text


def epsilon_loss(noise_sched, text: torch.Tensor, seed: int):
    """``loss(batch, unet)``: epsilon prediction on a :class:`~lorakit.toyworld.base.LatentCaptions` batch,
    noise and timesteps drawn per sample id, Min-SNR-5 weighting."""
    from lorakit.training.loop import randint_per_sample, randn_per_sample

    snr = noise_sched.alphas_cumprod / (1 - noise_sched.alphas_cumprod)

    def loss(b, unet):
        x0, sid = b["latent"], b["sample_id"]
        noise = randn_per_sample(x0.shape[1:], sid, seed, salt=0, device=x0.device)
        t = randint_per_sample(0, noise_sched.config.num_train_timesteps, sid, seed, salt=1, device=x0.device)
        xt = noise_sched.add_noise(x0, noise, t)
        pred = unet(xt, t, text[b["caption"]]).sample
        w = (torch.clamp(snr[t.cpu()], max=5.0) / snr[t.cpu()]).to(x0.device)  # Min-SNR-5 for epsilon
        return (w * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()

    return loss
