"""One denoising training step, shared by the trainers: latents from a batch, noise (with an optional offset),
uniform timesteps, the epsilon or v-prediction target, the UNet's prediction and min-SNR-gamma weights.

Every draw is keyed by the sample's global id (:mod:`lorakit.rng`), so the step is the same on any number of
processes and after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from lorakit.conditioning import added_cond_kwargs
from lorakit.rng import randint_per_sample, randn_per_sample

# Salts of the per-sample random streams.
SALT_LATENT, SALT_NOISE, SALT_OFFSET, SALT_TIMESTEP = 20, 21, 22, 23
PREDICTION_TYPES = ("epsilon", "v_prediction")


def training_scheduler(pipe, prediction_type: str | None = None) -> DDPMScheduler:
    """A DDPM scheduler with the base's noise schedule; ``prediction_type`` (if set) overrides the base's, in
    the training scheduler and in the pipeline's (so samples match)."""
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if prediction_type:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r}: expected 'epsilon' or 'v_prediction'")
        scheduler.register_to_config(prediction_type=prediction_type)
        pipe.scheduler.register_to_config(prediction_type=prediction_type)
    return scheduler


def vae_latents(vae, batch: dict, seed: int, dtype, vae_dtype=None) -> torch.Tensor:
    """Scaled latents of a batch: a draw from the VAE posterior (cached ``latent_mean`` / ``latent_std``, or the
    encoded ``pixel_values``), keyed by ``batch["sample_id"]``."""
    device = vae.device
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"], batch["latent_std"]
    else:
        with torch.no_grad():
            dist = vae.encode(batch["pixel_values"].to(device, vae_dtype or vae.dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
    eps = randn_per_sample(mean.shape[1:], batch["sample_id"], seed, SALT_LATENT, device)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((mean + std * eps - shift) * vae.config.scaling_factor).to(dtype)


def draw_noise(latents, sample_ids, seed: int, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like ``latents``, plus ``noise_offset`` x a per-channel offset."""
    dev = latents.device
    noise = randn_per_sample(latents.shape[1:], sample_ids, seed, SALT_NOISE, dev, latents.dtype)
    if noise_offset:
        offset = randn_per_sample((latents.shape[1], 1, 1), sample_ids, seed, SALT_OFFSET, dev, latents.dtype)
        noise = noise + noise_offset * offset
    return noise


def target_of(scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet learns to predict under the scheduler's ``prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not supported; use 'epsilon' or 'v_prediction'")


@dataclass
class Prediction:
    """The UNet's prediction on a noised batch, with what it should have predicted."""

    pred: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor


def predict(unet, scheduler, latents, cond: dict, sample_ids, seed: int, noise_offset: float = 0.0,
            time_ids=None) -> Prediction:
    """Noise ``latents`` at per-sample uniform timesteps and run the UNet on them.

    Args:
        cond: ``encoder_hidden_states`` (+ SDXL ``text_embeds``), from :mod:`lorakit.conditioning`.
        sample_ids: [b] global sample ids (keys of the noise / timestep draws).
        time_ids: SDXL [b, 6] (original size, crop top-left, target size).
    """
    noise = draw_noise(latents, sample_ids, seed, noise_offset)
    timesteps = randint_per_sample(0, scheduler.config.num_train_timesteps, sample_ids, seed, SALT_TIMESTEP,
                                   latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, cond["encoder_hidden_states"], **added_cond_kwargs(cond, time_ids)).sample
    return Prediction(pred, target_of(scheduler, latents, noise, timesteps), timesteps)


def min_snr_weights(scheduler, timesteps, gamma: float | None) -> torch.Tensor | None:
    """Per-sample loss weights of min-SNR-gamma (arXiv 2303.09556), or None when ``gamma`` is unset or 0."""
    if not gamma or gamma <= 0:
        return None
    snr = compute_snr(scheduler, timesteps)
    weight = torch.clamp(snr, max=gamma)
    return weight / snr if scheduler.config.prediction_type == "epsilon" else weight / (snr + 1)
