"""Phases shared by the diffusion trainers (block-wise LoRA, ED-LoRA): check the recipe, load and freeze the
base, place it on the device in the compute dtype, and sample it during training."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit import models  # looked up at call time: tests replace models.load_base

FROZEN = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclass
class DiffusionRun:
    """What every diffusion trainer's phases share; each trainer's ``Run`` adds its own fields after these."""

    cfg: object
    accelerator: object
    pipe: object
    arch: str


def require_base(cfg, pipe) -> None:
    """A recipe must name its base unless a loaded pipeline is given."""
    if not cfg.base_model and pipe is None:
        raise ValueError("base_model is not set (a diffusers folder, a .safetensors checkpoint, a hub id or tiny:sd1)")


def base_pipeline(cfg, pipe=None):
    """``pipe``, or the recipe's ``base_model`` loaded."""
    return pipe if pipe is not None else models.load_base(cfg.base_model)


def freeze_and_place(pipe, device, dtype: torch.dtype, vae_dtype: torch.dtype) -> None:
    """Freeze every model of the base and move it to ``device`` in ``dtype`` (the VAE in ``vae_dtype``)."""
    for comp in FROZEN:
        model = getattr(pipe, comp, None)
        if model is not None:
            model.requires_grad_(False)
            model.to(device, dtype=vae_dtype if comp == "vae" else dtype)


def sample_images(pipe, cfg, accelerator, **inputs):
    """Images of the recipe's sample settings (``sample_*`` keys), seeded, under the run's autocast."""
    size = cfg.sample_resolution or cfg.data.resolution
    gen = torch.Generator(device="cpu").manual_seed(cfg.sample_seed)
    pipe.set_progress_bar_config(disable=True)  # the training bar stays the one bar; a sampling one would nest under it
    with accelerator.autocast():
        return pipe(num_inference_steps=cfg.sample_num_inference_steps, guidance_scale=cfg.sample_guidance_scale,
                    generator=gen, height=size, width=size, **inputs).images


def trainable_count(groups: list[dict]) -> int:
    """Number of trainable parameters in optimizer groups."""
    return sum(p.numel() for g in groups for p in g["params"] if p.requires_grad)
