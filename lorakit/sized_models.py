"""Random-weight pipelines at three sizes, built offline: ``tiny`` (:mod:`lorakit.tiny_models`), ``mid`` (SD's
channel ratios at 1/10 width) and ``full`` (the released models' UNet / VAE / text encoder configs, written out
below: SD 1.5 860M-parameter UNet, SD 2.x 866M, SDXL 2.6B). ``component_factories`` gives the constructors, so
:mod:`lorakit.memory` can build the same models on the meta device for free."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lorakit.tiny_models import (
    ARCHES,
    assemble_pipeline,
    tiny_pipeline,
    tiny_text_encoder,
    tiny_tokenizer,
    tiny_unet,
    tiny_vae,
)

SIZES = ("tiny", "mid", "full")
CLIP_VOCAB = 49408  # the real CLIP vocabulary size; full-size text encoders get it so parameter counts match


def parse_random_spec(spec: str) -> tuple[str, str, int]:
    """``random:ARCH:SIZE[:SEED]`` -> ``(arch, size, seed)``; a ValueError names what was expected."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or parts[0] != "random" or parts[1] not in ARCHES or parts[2] not in SIZES:
        raise ValueError(f"{spec!r}: expected random:ARCH:SIZE[:SEED] with ARCH in {ARCHES} and SIZE in {SIZES}")
    try:
        seed = int(parts[3]) if len(parts) == 4 else 0
    except ValueError:
        raise ValueError(f"{spec!r}: the seed must be an integer") from None
    return parts[1], parts[2], seed


# The released models' configs (diffusers / transformers keys), random weights. Only sizes matter here.
_FULL_UNET = {
    "sd1": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "sd2": dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True, upcast_attention=True),
    "sdxl": dict(
        sample_size=128, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}
_FULL_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
)
# (hidden, intermediate, layers, heads, act, projection_dim)
_CLIP_L = (768, 3072, 12, 12, "quick_gelu", 768)
_OPENCLIP_H = (1024, 4096, 23, 16, "gelu", 512)
_OPENCLIP_BIGG = (1280, 5120, 32, 20, "gelu", 1280)
_FULL_TEXT = {"sd1": (_CLIP_L,), "sd2": (_OPENCLIP_H,), "sdxl": (_CLIP_L, _OPENCLIP_BIGG)}


def _text_encoder(vocab_size: int, spec: tuple, with_projection: bool, bos: int, eos: int):
    hidden, inter, layers, heads, act, proj = spec
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=77, projection_dim=proj, hidden_act=act,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _mid_unet(arch: str):
    """SD's shape at 1/10 width: every level's convolutions cost about the same, as in SD."""
    if arch == "sdxl":
        return UNet2DConditionModel(
            sample_size=32, block_out_channels=(32, 64, 128), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 8), cross_attention_dim=64,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=32,
        )
    return UNet2DConditionModel(
        sample_size=32, block_out_channels=(32, 64, 128, 128), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32, use_linear_projection=arch == "sd2",
    )


def component_factories(arch: str, size: str, tokenizer=None) -> dict:
    """Zero-argument constructors of a pipeline's models: ``{"unet", "vae", "text_encoder"[, "text_encoder_2"]}``.

    Call them under ``torch.device("meta")`` to get the shapes without memory (:mod:`lorakit.memory`).
    ``tokenizer``: the tokenizer whose special ids the text encoders use (default: :func:`tiny_tokenizer`).
    """
    if arch not in ARCHES or size not in SIZES:
        raise ValueError(f"unknown arch/size {arch!r}/{size!r}; expected one of {ARCHES} / {SIZES}")
    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    vocab = len(tok)
    sdxl = arch == "sdxl"
    if size == "full":
        bos, eos = tok.bos_token_id, tok.eos_token_id
        vae_kw = dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True) if sdxl else dict(sample_size=512)
        out = {"unet": lambda: UNet2DConditionModel(**_FULL_UNET[arch]),
               "vae": lambda: AutoencoderKL(**_FULL_VAE, **vae_kw)}
        specs = _FULL_TEXT[arch]
        out["text_encoder"] = lambda: _text_encoder(CLIP_VOCAB, specs[0], False, bos, eos)
        if sdxl:
            out["text_encoder_2"] = lambda: _text_encoder(CLIP_VOCAB, specs[1], True, bos, eos)
        return out
    out = {"unet": (lambda: tiny_unet(arch)) if size == "tiny" else (lambda: _mid_unet(arch)), "vae": tiny_vae}
    out["text_encoder"] = lambda: tiny_text_encoder(vocab, 32, 2, with_projection=False)
    if sdxl:
        out["text_encoder_2"] = lambda: tiny_text_encoder(vocab, 32, 2, with_projection=True)
    return out


class default_dtype:
    """Context manager: build modules directly in ``dtype`` (a bf16 SDXL UNet never exists in fp32)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


def sized_pipeline(arch: str = "sd1", size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu"):
    """A random-weight pipeline of ``arch`` at ``size`` (``tiny`` | ``mid`` | ``full``), built offline.

    ``tiny`` is exactly :func:`tiny_pipeline`. ``full`` has the released models' parameter counts (SD 1.5:
    UNet 860M, VAE 84M, CLIP-L 123M; SDXL: UNet 2.57B, VAE 84M, CLIP-L + OpenCLIP-bigG 817M) with a small offline
    tokenizer (the text encoders keep CLIP's 49408-row embedding). Weights are created in ``dtype`` on ``device``
    (a GPU initialises SD 1.5 in a second; the CPU takes ~30 s), so a bf16 SDXL needs ~7 GB, not 14. The weights
    depend on the device's random generator: one seed gives one pipeline per device.
    """
    if size == "tiny":
        return tiny_pipeline(arch, seed=seed).to(device=device, dtype=dtype)
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    with default_dtype(dtype), torch.device(device):
        models = {name: make() for name, make in component_factories(arch, size, tok).items()}
    return assemble_pipeline(arch, models, tok)
