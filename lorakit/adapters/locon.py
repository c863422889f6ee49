"""LoCon (LyCORIS "LoRA for convolution"): a :class:`~lorakit.adapters.lora.LoraModule` on a Conv2d with a
spatial kernel (``down [r, in, kh, kw]``, ``up [out, r, 1, 1]``). Same file keys as LoRA; the kind is told by
the shapes, so this module only holds that rule."""

from __future__ import annotations

from lorakit.adapters.lora import LoraModule

def is_locon(module) -> bool:
    """A LoRA module whose down factor has a kernel larger than 1x1."""
    return isinstance(module, LoraModule) and module.is_conv and tuple(module.down.shape[-2:]) != (1, 1)
