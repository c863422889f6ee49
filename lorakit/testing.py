"""Helpers for tests and benchmarks: random adapters on a pipeline and deterministic UNet inputs."""

from __future__ import annotations

import torch

from lorakit.adapters.synthetic import random_adapter  # noqa: F401 - tests and benchmarks import it from here
from lorakit.conditioning import is_sdxl


def unet_inputs(pipe, batch: int = 1, seed: int = 0) -> dict:
    """Deterministic keyword inputs for ``pipe.unet(**inputs)`` (latents, timestep, text features, SDXL ids)."""
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    size = cfg.sample_size
    inputs = {
        "sample": torch.randn(batch, cfg.in_channels, size, size, generator=g),
        "timestep": torch.tensor([500] * batch),
        "encoder_hidden_states": torch.randn(batch, 77, cfg.cross_attention_dim, generator=g),
    }
    if is_sdxl(pipe):
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * batch),
        }
    return inputs


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so that a second training in the same process builds its
    ``Accelerator`` afresh (accelerate keeps one shared state per process and refuses some changes to it)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
