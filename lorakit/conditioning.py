"""What a Stable Diffusion UNet is conditioned on: prompts through the text encoder(s), and for SDXL the pooled
text embedding and the six size/crop ``time_ids``.

One answer to "is this SDXL?" (the UNet takes the ``text_time`` added embedding), one pixel size, one way to
tokenize, encode and build ``time_ids`` (without diffusers' private pipeline helpers).
"""

from __future__ import annotations

import torch

TEXT_ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


def detect_arch(unet_config) -> str:
    """Name the architecture of a UNet from its config: ``sd1``, ``sd2`` or ``sdxl``.

    Args:
        unet_config: a ``UNet2DConditionModel.config`` (FrozenDict) or a plain dict.
    Raises:
        ValueError: for a UNet that is none of the three, naming what was found.
    """
    cfg = dict(unet_config)
    down = tuple(cfg.get("down_block_types", ()))
    if cfg.get("addition_embed_type") == "text_time" and len(down) == 3:
        return "sdxl"
    if len(down) == 4 and cfg.get("addition_embed_type") is None:
        return "sd2" if cfg.get("use_linear_projection") or cfg.get("cross_attention_dim") == 1024 else "sd1"
    raise ValueError(
        f"unsupported UNet: down_block_types={list(down)}, addition_embed_type={cfg.get('addition_embed_type')!r}; "
        "lorakit supports SD1.x, SD2.x and SDXL UNets (4 down blocks, or 3 down blocks with text_time embedding)"
    )


def pipeline_arch(pipe) -> str:
    """Architecture name (``sd1``/``sd2``/``sdxl``) of a loaded diffusers pipeline."""
    return detect_arch(pipe.unet.config)


def is_sdxl(pipe) -> bool:
    """Whether the pipeline's UNet is SDXL's (it needs ``text_embeds`` and ``time_ids`` besides the prompt)."""
    return dict(pipe.unet.config).get("addition_embed_type") == "text_time"


def pixel_size(pipe) -> int:
    """The image side the base was trained at: the UNet's latent size times the VAE's downscale."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def text_encoders(pipe) -> list[tuple[str, str]]:
    """``[(text encoder component, its tokenizer component)]`` that the pipeline has."""
    return [(enc, tok) for enc, tok in TEXT_ENCODERS if getattr(pipe, enc, None) is not None]


def token_ids(tokenizer, texts: list[str], device=None) -> torch.Tensor:
    """Token ids ``[b, model_max_length]``, padded and truncated as the pipelines do."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode_prompts(pipe, captions: list[str], encoders: dict | None = None, device=None) -> dict:
    """Text conditioning for the UNet, differentiable through ``encoders`` (training).

    SD1/SD2: ``encoder_hidden_states`` [b, 77, d] (last hidden state). SDXL: penultimate hidden states of both
    encoders concatenated [b, 77, d1 + d2] and ``text_embeds`` [b, d2] (pooled projection of encoder 2).
    ``encoders`` maps component names to the modules to call (the prepared ones when they train); the
    pipeline's own encoders otherwise.
    """
    encoders = encoders or {}
    enc = {c: encoders[c] if encoders.get(c) is not None else getattr(pipe, c, None) for c, _ in TEXT_ENCODERS}
    if not is_sdxl(pipe):
        return {"encoder_hidden_states": enc["text_encoder"](token_ids(pipe.tokenizer, captions, device))[0]}
    out1 = enc["text_encoder"](token_ids(pipe.tokenizer, captions, device), output_hidden_states=True)
    out2 = enc["text_encoder_2"](token_ids(pipe.tokenizer_2, captions, device), output_hidden_states=True)
    hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    return {"encoder_hidden_states": hidden, "text_embeds": out2[0]}


def sdxl_time_ids(original_size, crop_top_left, target_size, rows: int = 1, dtype=torch.float32,
                  device=None) -> torch.Tensor:
    """SDXL's added time ids ``[rows, 6]``: original (h, w), crop top-left (top, left), target (h, w)."""
    row = [*original_size, *crop_top_left, *target_size]
    return torch.tensor([row] * rows, dtype=dtype, device=device)


def batch_time_ids(batch: dict, dtype, device=None) -> torch.Tensor:
    """SDXL time ids ``[b, 6]`` of a training batch (per-sample ``original_size``, ``crop_top_left``,
    ``target_size``)."""
    return torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], 1).to(device, dtype)


def added_cond_kwargs(cond: dict, time_ids) -> dict:
    """The UNet's keyword arguments for the added conditioning (empty for SD1/SD2)."""
    if "text_embeds" not in cond:
        return {}
    return {"added_cond_kwargs": {"text_embeds": cond["text_embeds"], "time_ids": time_ids}}
