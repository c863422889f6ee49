"""Memory of gradient fusion, for :func:`lorakit.memory.estimate`: the layers it solves (read from the adapter
files or from a meta UNet) and the bytes of its Gram matrices, weight copies, widest solve and unfolded inputs."""

from dataclasses import dataclass

import torch

from lorakit.adapters.io import load_adapter
from lorakit.fusion.gradient_solve import stage_of


@dataclass(frozen=True)
class FusionLayer:
    """One layer gradient fusion solves: adapter key, output and flattened input width (``in * kh * kw``), the
    sum of the concepts' ranks on it, and whether it is a conv with a kernel larger than 1 x 1 (unfolded)."""

    key: str
    out: int
    in_flat: int
    rank: int
    is_conv: bool = False
    kernel: bool = False


def fusion_layers(paths) -> list[FusionLayer]:
    """The layers gradient fusion of these adapter files solves, from the files' LoRA factors (LoHa / LoKr in
    their exact LoRA form). Raises what :func:`lorakit.adapters.io.load_adapter` raises."""
    found: dict[str, FusionLayer] = {}
    for path in paths:
        for key, mod in load_adapter(path).modules.items():
            mod = mod.to_lora()
            shape = tuple(mod.down.shape)
            prev = found.get(key)
            found[key] = FusionLayer(key, int(mod.up.shape[0]), int(torch.Size(shape[1:]).numel()),
                                     (prev.rank if prev else 0) + int(shape[0]), len(shape) == 4,
                                     len(shape) == 4 and shape[2] * shape[3] > 1)
    return list(found.values())


def meta_fusion_layers(unet, rank: int) -> list[FusionLayer]:
    """The LoRA'd layers of a meta UNet (after ``lorakit.memory._add_lora``), each with total rank ``rank``."""
    out = []
    for name, m in unet.named_modules():
        layer = getattr(m, "base_layer", None)
        if not hasattr(m, "lora_A") or layer is None:
            continue
        conv = isinstance(layer, torch.nn.Conv2d)
        out.append(FusionLayer("unet." + name, layer.weight.shape[0], _flat_in(layer), rank, conv,
                               conv and layer.kernel_size[0] * layer.kernel_size[1] > 1))
    return out


def add_gradient_fusion_parts(parts: dict[str, int], layers: list[FusionLayer], max_conv_dim: int, dtype, heldout: bool,
                              rows: int) -> None:
    """Gradient fusion's parts (see :mod:`lorakit.memory`). Its stages (text encoder, to_k/to_v, UNet) run one
    after another, each holding only its own Gram matrices: ``[d, d] + [R, d]`` float64 per layer and split,
    ``d = in * kh * kw``, or ``d = R`` for a conv solved in its LoRA subspace (``in * kh * kw > max_conv_dim``);
    the held-out split (``--ridge auto``) doubles them. The base weights of every adapted layer are copied once,
    the UNet stage's layers once more (restored after the concepts' passes). The widest solve holds four
    ``[d, d]`` float64 matrices (eigenvectors, fit + held-out Gram, ``G + lam I``, its Cholesky factor); the
    widest unfolded conv input ``[rows, d]`` is held in the run's dtype and float64 while capturing."""
    size = torch.finfo(dtype).bits // 8
    splits = 2 if heldout else 1
    per_stage: dict[str, int] = {}
    widest = unfolded = 0
    for layer in layers:
        subspace = layer.is_conv and layer.in_flat > max_conv_dim
        d = layer.rank if subspace else layer.in_flat
        stage = stage_of(layer.key)
        per_stage[stage] = per_stage.get(stage, 0) + splits * 8 * (d * d + layer.rank * d)
        widest = max(widest, d)
        if layer.kernel and not subspace:
            unfolded = max(unfolded, layer.in_flat)
    parts["gram"] = max(per_stage.values(), default=0)
    parts["copies"] = size * sum(layer.out * layer.in_flat * (2 if stage_of(layer.key) == "unet" else 1)
                                     for layer in layers)
    parts["solve"] = 4 * 8 * widest * widest
    parts["capture"] = rows * unfolded * (size + 8)


def _flat_in(layer: torch.nn.Module) -> int:
    """Width of a layer's unfolded input: ``in_features``, or ``in_channels * kh * kw`` for a conv."""
    if isinstance(layer, torch.nn.Conv2d):
        return layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    return getattr(layer, "in_features", 0)
