"""Tiny random-weight Stable Diffusion pipelines with the real architectures' module names and block layout
(SD1: 4 down blocks, 3 with cross-attention; SDXL: 3 down blocks, 2 text encoders, added time ids), an offline
CLIP tokenizer, and SD's training noise schedule. They build in about a second on a CPU; tests use them for
mechanics and the toy world builds its base from the same constructors."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

ARCHES = ("sd1", "sd2", "sdxl")

# Words the offline tokenizer knows as single tokens; any other text is still tokenized, byte by byte.
_TINY_WORDS = (
    "a an the of and with in on at photo picture image painting drawing style man woman cat dog boy girl "
    "person character object background red green blue yellow orange purple pink white black gray brown "
    "cyan magenta circle square triangle star ring cross diamond heart hat ball umbrella box tree house "
    "sky sea beach grass sand stripes dots checker gradient plain pixel ink outline pastel neon sketch "
    "big small large tiny left right top bottom center wearing holding standing sitting high quality"
).split()


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encode one word (already split into symbols) with merge ``ranks``, as the BPE model does."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def tiny_tokenizer(words: tuple[str, ...] = _TINY_WORDS):
    """A CLIP tokenizer built offline: byte-level BPE whose merges make each word in ``words`` one token.

    Returns:
        ``transformers.CLIPTokenizer`` with ``model_max_length`` 77.
    """
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for tok in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Run BPE with the merges so far; while the word is not one token, merge its first two pieces.
        while True:
            pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
            if len(pieces) == 1:
                break
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tok.pad_token = "<|endoftext|>"
    return tok


def tiny_text_encoder(vocab_size: int, hidden: int, layers: int, with_projection: bool):
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg)


def tiny_unet(arch: str = "sd1", cross_attention_dim: int | None = None, **overrides):
    """A small random ``UNet2DConditionModel`` with the real architecture's block layout and module names.

    SD1: 4 down blocks (3 cross-attention), ``layers_per_block=2``, latent 16x16.
    SDXL: 3 down blocks (last 2 cross-attention, 1 and 2 transformer layers), text_time added embedding.
    ``overrides``: other ``UNet2DConditionModel`` arguments (the toy world's base is narrower).
    """
    if arch in ("sd1", "sd2"):
        settings = dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=cross_attention_dim or 32,
            attention_head_dim=8,
            norm_num_groups=16,
            use_linear_projection=arch == "sd2",
        )
        return UNet2DConditionModel(**{**settings, **overrides})
    if arch == "sdxl":
        text_dim = 32
        return UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            cross_attention_dim=cross_attention_dim or 2 * text_dim,
            attention_head_dim=(2, 4, 8),
            norm_num_groups=16,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=text_dim + 6 * 8,
            **overrides,
        )
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHES}")


def tiny_vae(**overrides):
    """A 2-level ``AutoencoderKL`` (scale factor 2, 4 latent channels); ``overrides``: other arguments."""
    settings = dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=32,
        norm_num_groups=16,
        layers_per_block=1,
    )
    return AutoencoderKL(**{**settings, **overrides})


def sd_scheduler(name: str = "ddim"):
    """A diffusers scheduler with Stable Diffusion's training noise schedule (scaled_linear 0.00085-0.012)."""
    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    table = {
        "ddim": lambda: DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        "ddpm": lambda: DDPMScheduler(**common, clip_sample=False),
        "euler": lambda: EulerDiscreteScheduler(**common),
        "euler_a": lambda: EulerAncestralDiscreteScheduler(**common),
        "dpmpp_2m": lambda: DPMSolverMultistepScheduler(**common),
        "dpmpp_2m_karras": lambda: DPMSolverMultistepScheduler(**common, use_karras_sigmas=True),
    }
    if name not in table:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {sorted(table)}")
    return table[name]()


def tiny_pipeline(arch: str = "sd1", seed: int = 0):
    """Build a random-weight Stable Diffusion pipeline of the given architecture, offline.

    Args:
        arch: ``sd1``, ``sd2`` or ``sdxl``.
        seed: seeds every weight, so two calls with one seed give identical pipelines.
    Returns:
        ``StableDiffusionPipeline`` (sd1/sd2) or ``StableDiffusionXLPipeline`` (sdxl), fp32, on the CPU,
        generating 32x32 images (latents 4 x 16 x 16).
    """
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHES}")
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    unet = tiny_unet(arch)
    vae = tiny_vae()
    models = {"unet": unet, "vae": vae}
    models["text_encoder"] = tiny_text_encoder(vocab, 32, 2, with_projection=False)
    if arch == "sdxl":
        models["text_encoder_2"] = tiny_text_encoder(vocab, 32, 2, with_projection=True)
    return assemble_pipeline(arch, models, tokenizer)


def assemble_pipeline(arch: str, models: dict, tokenizer):
    """A diffusers pipeline from built models (``unet``, ``vae``, ``text_encoder``[, ``text_encoder_2``]) with the
    default scheduler of ``arch`` (DDIM; Euler for SDXL, whose second tokenizer is :func:`tiny_tokenizer`), no
    safety checker and no progress bar."""
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(tokenizer=tokenizer, tokenizer_2=tiny_tokenizer(),
                                         scheduler=sd_scheduler("euler"), **models)
    else:
        pipe = StableDiffusionPipeline(tokenizer=tokenizer, scheduler=sd_scheduler("ddim"), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False, **models)
    pipe.set_progress_bar_config(disable=True)
    return pipe
