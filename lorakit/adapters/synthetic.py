"""Random adapters on a pipeline's real modules: the synthetic LoRAs of the LoRA.rar toy recipe, tests and
benchmarks."""

from __future__ import annotations

import torch

from lorakit.adapters.io import Adapter, LoraModule, adapter_metadata, file_path
from lorakit.blocks import (
    lora_able_modules,
    module_ranks,
    resolve_block_spec,
    text_encoder_modules,
)
from lorakit.conditioning import pipeline_arch, text_encoders


def random_adapter(
    pipe,
    blocks="all",
    network: str = "lora",
    rank: int = 4,
    alpha: float = 2.0,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    text_encoder: bool = False,
    seed: int = 0,
    std: float = 0.1,
) -> Adapter:
    """An adapter with random non-zero down/up weights on the modules a block spec selects.

    Args:
        pipe: a diffusers SD/SDXL pipeline (tiny ones in tests).
        blocks / network / rank / alpha / conv_*: as in a training config.
        text_encoder: also adapt every text encoder's attention and MLP layers (rank ``rank``).
        std: standard deviation of the random entries.
    """
    arch = pipeline_arch(pipe)
    g = torch.Generator().manual_seed(seed)
    ranks = module_ranks(
        lora_able_modules(pipe.unet),
        resolve_block_spec(blocks, arch, rank),
        network,
        rank=rank,
        alpha=alpha,
        conv_rank=conv_rank,
        conv_alpha=conv_alpha,
    )
    adapter = Adapter(metadata=adapter_metadata(arch, network, rank=rank, alpha=alpha))
    targets = [("unet", pipe.unet, name, r, a) for name, (r, a) in ranks.items()]
    if text_encoder:
        for comp, _ in text_encoders(pipe):
            model = getattr(pipe, comp)
            targets += [(comp, model, n, rank, alpha) for n in text_encoder_modules(model)]
    for comp, model, name, r, a in targets:
        layer = model.get_submodule(name)
        if isinstance(layer, torch.nn.Linear):
            down = torch.randn(r, layer.in_features, generator=g) * std
            up = torch.randn(layer.out_features, r, generator=g) * std
        elif tuple(layer.kernel_size) == (1, 1):
            down = torch.randn(r, layer.in_channels, 1, 1, generator=g) * std
            up = torch.randn(layer.out_channels, r, 1, 1, generator=g) * std
        else:
            down = torch.randn(r, layer.in_channels, *layer.kernel_size, generator=g) * std
            up = torch.randn(layer.out_channels, r, 1, 1, generator=g) * std
        adapter.modules[f"{comp}.{file_path(model, comp, name)}"] = LoraModule(down, up, float(a))
    return adapter
