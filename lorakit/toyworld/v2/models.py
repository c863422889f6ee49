"""Toy world v2's model architecture: SD1's real UNet layout on 4x16x16 latents of 64x64 images.

* VAE: ``AutoencoderKL`` with 3 levels (16, 32, 32 channels), so 2 downsamplings: 64x64 RGB <-> 4x16x16 (8x,
  SD's factor, would leave 1x1 at the UNet's bottom). No attention; GroupNorm with 4 groups (flat colours
  survive; see ``lorakit.toyworld.base``).
* UNet: ``UNet2DConditionModel`` exactly in SD1's layout: 4 levels, ``layers_per_block=2``, cross-attention in
  the first three down blocks and the last three up blocks, so the 25-value kohya block vectors and the
  17-value LoRA Block Weight vectors address the blocks they address on SD 1.5. Narrow channels
  (32, 32, 64, 64), cross-attention width 64.
* Text encoder: a 2-layer CLIP text model of width 64, frozen at its random initialisation (as in v1);
  tokenizer: offline BPE in which every v2 word and trigger is one token.
* Scheduler: DDIM with Stable Diffusion's noise schedule.
"""

from __future__ import annotations

import torch

from lorakit.toyworld.v2.concepts import VOCAB

TEXT_WIDTH = 64
IMAGE_SIZE = 64
LATENT_SIZE = 16


def toy_tokenizer():
    """Offline CLIP tokenizer with every v2 word and trigger as a single token."""
    from lorakit.models import tiny_tokenizer

    return tiny_tokenizer(VOCAB)


def toy_vae():
    """Untrained 3-level ``AutoencoderKL`` (64x64 RGB <-> 4x16x16)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )
    # A tiny posterior std at the start (logvar -10): with diffusers' default (std ~1) the decoder first learns
    # only blurry averages of noisy latents.
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels :] = -10.0
    return vae


def toy_unet():
    """Untrained ``UNet2DConditionModel`` in SD1's block layout for 4x16x16 latents."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def toy_text_encoder(vocab_size: int):
    """Random 2-layer CLIP text encoder of width 64 (frozen in training)."""
    from lorakit.models import _tiny_text_encoder

    return _tiny_text_encoder(vocab_size, TEXT_WIDTH, 2, with_projection=False)


def build_toy_pipeline(seed: int = 0, vae=None, unet=None):
    """A v2 ``StableDiffusionPipeline`` (untrained unless ``vae``/``unet`` are given), fp32, CPU.

    The text encoder's weights depend only on ``seed``.
    """
    from diffusers import StableDiffusionPipeline

    from lorakit.models import sd_scheduler

    torch.manual_seed(seed)
    tokenizer = toy_tokenizer()
    text_encoder = toy_text_encoder(len(tokenizer))
    pipe = StableDiffusionPipeline(
        vae=vae if vae is not None else toy_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet if unet is not None else toy_unet(),
        scheduler=sd_scheduler("ddim"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
