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

import sys

from lorakit.models import tiny_tokenizer
from lorakit.resources import data_path
from lorakit.tiny_models import tiny_unet
from lorakit.toyworld import base as v1
from lorakit.toyworld.base import toy_text_encoder  # noqa: F401 - the same frozen 2-layer encoder as v1
from lorakit.toyworld.v2.concepts import VOCAB

TEXT_WIDTH = v1.TEXT_WIDTH
IMAGE_SIZE = 64
LATENT_SIZE = 16
# The trained v2 pipeline that ships with lorakit (see its README.md).
DEFAULT_BASE = data_path("toy2-base")


def toy_tokenizer():
    """Offline CLIP tokenizer with every v2 word and trigger as a single token."""
    return tiny_tokenizer(VOCAB)


def toy_vae():
    """Untrained 3-level ``AutoencoderKL`` (64x64 RGB <-> 4x16x16), v1's VAE with one more level."""
    return v1.toy_vae(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                      up_block_types=("UpDecoderBlock2D",) * 3, sample_size=IMAGE_SIZE)


def toy_unet():
    """Untrained ``UNet2DConditionModel`` in SD1's block layout (``layers_per_block=2``) for 4x16x16 latents."""
    return tiny_unet("sd1", cross_attention_dim=TEXT_WIDTH, sample_size=LATENT_SIZE, norm_num_groups=8)


def build_toy_pipeline(seed: int = 0, vae=None, unet=None):
    """A v2 ``StableDiffusionPipeline`` (untrained unless ``vae``/``unet`` are given), fp32, CPU.

    The text encoder's weights depend only on ``seed``.
    """
    return v1.build_toy_pipeline(seed, vae, unet, parts=sys.modules[__name__])
