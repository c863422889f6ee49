"""Train the toy world v2 base: 64x64 scenes, SD1's real UNet layout, resumable in chunks on a CPU.

Stages, all in ``--work`` (rerun the same command to continue where it stopped; see docs/toyworld_v2.md):
  1. render   ``--n-class`` scenes of the class world (the UNet's data) and ``--n-mixed`` scenes with the
              identities mixed in (VAE only)
  2. vae      AutoencoderKL on random 32x32 crops (the VAE is fully convolutional, so crops cost 1/4 of a
              full image and teach the same), L1 + 1e-6 KL, lorakit's TrainLoop
  3. latents  encode the class scenes (full 64x64 -> 4x16x16); ``scaling_factor`` = 1 / std(latents)
  4. unet     epsilon prediction, Min-SNR-5, 10% empty captions, EMA (its shadow weights train beside the UNet
              in the same checkpoints, so a resumed run continues the EMA bit-exactly); text encoder frozen
  5. export   with ``--out``: the EMA pipeline (fp32) to that folder

Every ``--save-every`` steps each stage writes a checkpoint (resume) and a usable artifact
(``<work>/unet/toy-unet-stepNNNNNN`` is a complete pipeline). A larger ``--unet-steps`` (or ``--vae-steps``)
continues the stage; the learning-rate schedule (100 warm-up steps, then constant) does not depend on the step
count, so a run in chunks equals one long run. ``--init-from PIPELINE`` starts the UNet from a trained v2 pipeline
(its VAE, text encoder and UNet) as a new run.

    python tools/train_toy_base_v2.py --work /tmp/toybase_v2 --vae-steps 1500 --unet-steps 20000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from toy_base_stages import continued_vae, epsilon_loss, load_rendered, log, posterior_stats, prepare_run
from toy_base_stages import render_once, to_tensor, train_autoencoder, train_config, unet_start

WARMUP = 100


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="working folder (data, checkpoints, partial pipelines)")
    p.add_argument("--out", help="export the final pipeline here (a new folder, or one lorakit wrote)")
    p.add_argument("--n-class", type=int, default=12000, help="class-world scenes (UNet and VAE data)")
    p.add_argument("--n-mixed", type=int, default=4000, help="scenes with identities (VAE data only)")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-crop", type=int, default=32, help="side of the random crops the VAE trains on")
    p.add_argument("--unet-steps", type=int, default=20000)
    p.add_argument("--unet-batch", type=int, default=16)
    p.add_argument("--unet-lr", type=float, default=6e-4)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--save-every", type=int, default=250, help="checkpoint + artifact every N steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", metavar="PIPELINE", help="start the UNet from this trained v2 pipeline")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ 1. render


def render_data(work: Path, n_class: int, n_mixed: int, seed: int) -> Path:
    from lorakit.toyworld.v2 import render, scenes

    return render_once(work, seed, [(scenes.class_scene, n_class), (scenes.mixed_scene, n_mixed)], render, "n_class")


def load_data(work: Path):
    return load_rendered(work, "n_class")


def _cfg(work: Path, name: str, steps: int, batch: int, lr: float, seed: int, save_every: int):
    return train_config(work, name, steps, batch, lr, seed, warmup=WARMUP, save_every=save_every,
                        checkpoint_every=save_every, keep_checkpoints=2)


# ------------------------------------------------------------------------------------------------ 2. vae


class Crops(torch.utils.data.Dataset):
    """uint8 images; each sample is a random ``crop`` x ``crop`` window drawn from its sample id."""

    def __init__(self, images: np.ndarray, crop: int, seed: int):
        self.images, self.crop, self.seed = images, crop, seed

    def __len__(self):
        return len(self.images)

    def get_item(self, i, sample_id):
        from lorakit.training.loop import sample_generator

        n = self.images.shape[1]
        y, x = torch.randint(0, n - self.crop + 1, (2,), generator=sample_generator(self.seed, sample_id, salt=7))
        return {"image": to_tensor(self.images[i : i + 1, y : y + self.crop, x : x + self.crop])[0]}


def train_vae(work: Path, args):
    from diffusers import AutoencoderKL

    from lorakit.toyworld.v2.models import toy_vae

    images, _, _ = load_data(work)
    torch.manual_seed(args.seed)
    vae = toy_vae()
    cfg = _cfg(work, "vae", args.vae_steps, args.vae_batch, args.vae_lr, args.seed, args.save_every)
    t0 = time.time()
    result = train_autoencoder(vae, cfg, Crops(images, args.vae_crop, args.seed))
    log(f"vae at step {result.global_step} ({time.time() - t0:.0f} s this run)")
    return AutoencoderKL.from_pretrained(result.final_path), result.global_step


# ------------------------------------------------------------------------------------------------ 3. latents


@torch.no_grad()
def encode_latents(work: Path, vae, vae_step: int):
    """Posterior means/stds of the class scenes, cached per VAE step."""
    from lorakit.fileio import load_safetensors, save_safetensors

    out = work / "latents.safetensors"
    if out.exists():
        t, _ = load_safetensors(out)
        if int(t["vae_step"]) == vae_step:
            return t["mean"], t["std"], float(t["scale"])
    images, n_class, _ = load_data(work)
    mean, std, scale = posterior_stats(vae, images, n_class)
    save_safetensors({"mean": mean, "std": std, "scale": torch.tensor(scale), "vae_step": torch.tensor(vae_step)}, out)
    return mean, std, scale


# ------------------------------------------------------------------------------------------------ 4. unet


class EMAShadow(torch.nn.Module):
    """The EMA weights as a module the training loop checkpoints with the UNet (its parameters are marked
    trainable so they are saved and restored, but no optimizer touches them: only ``update`` changes them)."""

    def __init__(self, unet, decay: float):
        import copy

        from diffusers.training_utils import EMAModel

        super().__init__()
        self.unet = copy.deepcopy(unet)
        self.steps = torch.nn.Parameter(torch.zeros(()))  # EMA updates so far (float: a checkpointed parameter)
        self.ema = EMAModel(self.unet.parameters(), decay=decay, use_ema_warmup=True, power=0.75)
        self.ema.shadow_params = list(self.unet.parameters())  # update these in place

    @torch.no_grad()
    def update(self, unet, step: int) -> None:
        """Fold the weights after optimizer step ``step`` in (once per step, in order)."""
        if step > int(self.steps):
            self.ema.optimization_step = int(self.steps)
            self.ema.step(unet.parameters())
            self.steps.add_(1)


def train_unet(work: Path, vae, mean, std, scale, args) -> Path:
    from diffusers import DDPMScheduler

    from lorakit.models import save_pipeline
    from lorakit.toyworld.base import LatentCaptions
    from lorakit.toyworld.v2.models import build_toy_pipeline
    from lorakit.training.loop import TrainLoop, build_optimizer, make_accelerator

    _, n_class, captions = load_data(work)
    vae.register_to_config(scaling_factor=scale)
    pipe = build_toy_pipeline(seed=args.seed, vae=vae)
    ids, text = unet_start(pipe, captions[:n_class], args.init_from)
    unet = pipe.unet
    shadow = EMAShadow(unet, args.ema_decay)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    cfg = _cfg(work, "unet", args.unet_steps, args.unet_batch, args.unet_lr, args.seed, args.save_every)
    acc = make_accelerator(cfg)
    opt = build_optimizer(cfg, [{"params": list(unet.parameters())}])
    data = LatentCaptions(mean * scale, std * scale, ids, args.seed)
    loss = epsilon_loss(noise_sched, text.to(acc.device), args.seed)

    def compute_loss(b, step, models):
        shadow.update(acc.unwrap_model(unet), step)  # the weights after optimizer step `step`
        return loss(b, models[0])

    def save(path):
        shadow.update(acc.unwrap_model(unet), loop.global_step)
        ema_unet = build_toy_pipeline(seed=args.seed).unet
        ema_unet.load_state_dict(shadow.unet.state_dict())
        out = build_toy_pipeline(seed=args.seed, vae=vae, unet=ema_unet.requires_grad_(False).cpu())
        out.text_encoder.load_state_dict(pipe.text_encoder.state_dict())
        save_pipeline(out, path, overwrite=True)  # inside the run's own (marked) output_dir
        log(f"saved pipeline (EMA) at step {loop.global_step} -> {path}")

    t0 = time.time()
    loop = TrainLoop(cfg, acc, [unet, shadow], opt, data, compute_loss, save, artifact_suffix="")
    result = loop.run()
    steps = len(result.losses)
    if steps:
        log(f"unet at step {result.global_step}: {steps} steps in {time.time() - t0:.0f} s "
            f"({sum(result.step_seconds) / steps:.2f} s/step), final loss {result.losses[-1]:.4f}")
    return Path(result.final_path)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = prepare_run(args)
    render_data(work, args.n_class, args.n_mixed, args.seed)
    if args.init_from:
        vae, scale = continued_vae(args.init_from)
        mean, std, _ = encode_latents(work, vae, -1)
    else:
        vae, vae_step = train_vae(work, args)
        mean, std, scale = encode_latents(work, vae, vae_step)
    final = train_unet(work, vae, mean, std, scale, args)
    if args.out:
        from diffusers import StableDiffusionPipeline

        from lorakit.models import save_pipeline

        save_pipeline(StableDiffusionPipeline.from_pretrained(final), args.out, overwrite=True)
        log(f"exported {final} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
