"""The toy base model's architecture: an SD1-layout pipeline small enough to train and sample on a CPU.

* VAE: ``AutoencoderKL`` with 2 levels (32x32 RGB <-> 4x16x16 latents, scale factor 2), no attention.
  (A 3-level VAE to 8x8 latents trained 300 steps still lost the colours; 2 levels reconstruct far sooner.)
* UNet: ``UNet2DConditionModel`` in SD1's layout (3 cross-attention down blocks + 1 plain, mirror on the way up)
  with narrow channels (32, 32, 64, 64) and ``layers_per_block=1`` on 16x16 latents; cross-attention width 64.
  One layer per block (SD1 has 2) keeps a training step affordable on a shared 2-core CPU; block presets
  (``all``, ``upper``, ``IN0``.., ``OUT3``) work as on SD1, kohya's 25-entry block vectors assume 2 layers.
* GroupNorm groups hold 4+ channels (VAE 4 groups, UNet 8): with 1-2 channels per group GroupNorm acts like
  instance norm and erases flat colours, which is most of what toy scenes are made of.
* Text encoder: a 2-layer CLIP text model of width 64, kept frozen at its random initialisation (the UNet
  learns to read its token-identity features); tokenizer: the offline BPE tokenizer whose vocabulary holds
  every toy-world word and trigger as one token.
* Scheduler: DDIM with Stable Diffusion's noise schedule.

``tools/train_toy_base.py`` trains the VAE and the UNet and saves the pipeline to ``data/toy-base``.
"""

from __future__ import annotations

import torch

from lorakit.models import tiny_tokenizer
from lorakit.tiny_models import assemble_pipeline, tiny_text_encoder, tiny_unet, tiny_vae
from lorakit.toyworld.concepts import VOCAB
from lorakit.training.loop import sample_generator

TEXT_WIDTH = 64
# Prompt words beyond the toy world's own that users may type (tokenized as single tokens too).
EXTRA_WORDS = ("photo", "picture", "image", "drawing", "style", "in", "on", "of", "the", "high", "quality")


def toy_tokenizer():
    """Offline CLIP tokenizer with every toy-world word and trigger word as a single token."""
    return tiny_tokenizer(tuple(dict.fromkeys(VOCAB + EXTRA_WORDS)))


def toy_vae(**overrides):
    """Untrained 2-level ``AutoencoderKL`` (scale factor 2, 4 latent channels); ``overrides``: other
    ``AutoencoderKL`` arguments (toy world v2's has 3 levels)."""
    vae = tiny_vae(**{"norm_num_groups": 4, "mid_block_add_attention": False, **overrides})
    # Start with a tiny posterior std (logvar -10): with diffusers' default (std ~1) the sampled latents are
    # mostly noise at first and the decoder learns only blurry averages for hundreds of steps.
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels :] = -10.0
    return vae


def toy_unet():
    """Untrained SD1-layout ``UNet2DConditionModel`` for 4x16x16 latents."""
    return tiny_unet("sd1", cross_attention_dim=TEXT_WIDTH, layers_per_block=1, norm_num_groups=8)


def toy_text_encoder(vocab_size: int):
    """Random 2-layer CLIP text encoder of width 64 (frozen in training)."""
    return tiny_text_encoder(vocab_size, TEXT_WIDTH, 2, with_projection=False)


def build_toy_pipeline(seed: int = 0, vae=None, unet=None, parts=None):
    """An (untrained unless ``vae``/``unet`` are given) toy ``StableDiffusionPipeline``, fp32, CPU.

    ``parts``: where ``toy_tokenizer``, ``toy_text_encoder``, ``toy_vae`` and ``toy_unet`` come from (default
    this module; toy world v2 passes its own). The text encoder's weights depend only on ``seed``.
    """
    import sys

    parts = parts or sys.modules[__name__]
    torch.manual_seed(seed)
    tokenizer = parts.toy_tokenizer()
    models = {"text_encoder": parts.toy_text_encoder(len(tokenizer))}
    models["vae"] = vae if vae is not None else parts.toy_vae()
    models["unet"] = unet if unet is not None else parts.toy_unet()
    return assemble_pipeline("sd1", models, tokenizer)


class LatentCaptions(torch.utils.data.Dataset):
    """The toy bases' UNet training data (``tools/train_toy_base*.py``): cached VAE posteriors + caption ids. The
    latent sample and the 10% caption dropout (id 0, the empty caption) come from the sample id, so any process
    layout and any resume draw the same."""

    def __init__(self, mean, std, caption_ids, seed):
        self.mean, self.std, self.ids, self.seed = mean, std, caption_ids, seed

    def __len__(self):
        return len(self.mean)

    def get_item(self, i, sample_id):
        g = sample_generator(self.seed, sample_id, salt=11)
        eps = torch.randn(self.mean[i].shape, generator=g)
        drop = torch.rand((), generator=g) < 0.1
        return {"latent": self.mean[i] + self.std[i] * eps, "caption": torch.tensor(0 if drop else self.ids[i])}
