"""Keep cross-attention key / value LoRA layers off the regularisation captions (``network.kv_reg_strength``).

A LoRA layer on a cross-attention key or value projection changes the key or value of every token of every
prompt (``delta @ e`` for each text embedding ``e``), not only of its trigger. Regularisation images hold the
images of prompts without the trigger in place through the denoising loss, but only on their own captions; other
prompts can still drift. After training, each such layer's delta is replaced by the one closest to it on the
training captions' tokens that changes the regularisation captions' tokens least, ``strength`` weighing the
second against the first:

    delta' = argmin_D  mean_own |(D - delta) e|^2 + strength * mean_reg |D e|^2
           = delta @ G_own @ inv(G_own + strength * G_reg),     G = mean over tokens of e e^T

(the least squares of gradient fusion, with the base itself, unchanged, as the second concept on the
regularisation captions). The rank stays: ``delta' = up @ (down @ M)``. Every other layer is left as trained.
"""

from __future__ import annotations

import torch

from lorakit.adapters.lora import LoraModule
from lorakit.conditioning import encode_prompts

# Added to the diagonal, relative to the mean eigenvalue, so that directions no token uses stay solvable.
JITTER = 1e-9


def token_gram(pipe, captions: list[str], batch_size: int = 16) -> torch.Tensor:
    """Mean ``e e^T`` over every token (padding included: the UNet attends to it) of ``captions``, float64
    ``[d, d]`` with ``d`` the UNet's cross-attention width; the pipeline's own (frozen) text encoders."""
    total, count = None, 0
    with torch.no_grad():
        for i in range(0, len(captions), batch_size):
            states = encode_prompts(pipe, captions[i:i + batch_size])["encoder_hidden_states"]
            flat = states.reshape(-1, states.shape[-1]).double().cpu()
            gram = flat.T @ flat
            total = gram if total is None else total + gram
            count += flat.shape[0]
    return total / count


def kv_layer_names(unet, names) -> list[str]:
    """The adapter layer names (``unet.<module path>``) that are key or value projections of a cross-attention."""
    out = []
    for name in names:
        if not name.startswith("unet."):
            continue
        path = name[len("unet."):]
        parent, _, leaf = path.rpartition(".")
        if leaf in ("to_k", "to_v") and getattr(unet.get_submodule(parent), "is_cross_attention", False):
            out.append(name)
    return out


def require_kv_layers(unet, names) -> list[str]:
    """:func:`kv_layer_names`, or ValueError when there are none (``network.kv_reg_strength`` would do nothing)."""
    picked = kv_layer_names(unet, names)
    if not picked:
        raise ValueError("network.kv_reg_strength: the adapter has no cross-attention key / value layers "
                         "(network.target_modules or network.blocks leave them out)")
    return picked


def input_map(own_gram: torch.Tensor, reg_gram: torch.Tensor, strength: float) -> torch.Tensor:
    """``M = G_own @ inv(G_own + strength * G_reg)`` ``[d, d]`` (float64)."""
    a = own_gram + strength * reg_gram
    a = a + JITTER * a.diagonal().mean() * torch.eye(a.shape[0], dtype=a.dtype)
    return torch.linalg.solve(a, own_gram).T  # a and G_own are symmetric: (a^-1 G_own)^T = G_own a^-1


def keep_off_regularisation(modules: dict, unet, own_gram: torch.Tensor, reg_gram: torch.Tensor,
                            strength: float) -> dict:
    """``modules`` (adapter name -> module) with every cross-attention key / value LoRA layer's ``down``
    replaced by ``down @ M`` (see the module docstring); the others as they are. Raises ValueError when no layer
    is one (the option would do nothing)."""
    names = require_kv_layers(unet, modules)
    m = input_map(own_gram, reg_gram, strength)
    out = dict(modules)
    for name in names:
        mod = modules[name]
        if not isinstance(mod, LoraModule) or mod.down.dim() != 2:
            raise ValueError(f"network.kv_reg_strength: layer {name} is not a linear LoRA layer")
        down = (mod.down.double() @ m.to(mod.down.device)).to(mod.down.dtype)
        out[name] = LoraModule(down=down.contiguous(), up=mod.up, alpha=mod.alpha)
    return out
