"""The adapter types lorakit reads and writes, and the layer types it refuses by name.

Adding a type: a module next to this one implementing :class:`lorakit.adapters.base.AdapterModule` with a
``from_parts(parts, kernel)`` class method, and one line in ``MODULE_TYPES``.
"""

from __future__ import annotations

from lorakit.adapters.lokr import LokrModule
from lorakit.adapters.loha import LohaModule
from lorakit.adapters.lora import LoraModule

# kind -> class. Each layer of a file is given to the type that owns the tensor suffixes it has.
MODULE_TYPES = {"lora": LoraModule, "loha": LohaModule, "lokr": LokrModule}

# tensor-name fragments of LyCORIS / kohya types lorakit does not read -> their name in error messages
UNSUPPORTED = {"oft_blocks": "OFT", "oft_diag": "OFT", "boft_": "BOFT", "dora_scale": "DoRA",
               "a1.weight": "GLoRA", "b1.weight": "GLoRA", ".diff": "LyCORIS full (diff)", ".on_input": "(IA)^3",
               ".weight_b": "(IA)^3"}

SUFFIXES = sorted({s for cls in MODULE_TYPES.values() for s in cls.suffixes}, key=len, reverse=True)


def split_layer_key(key: str) -> tuple[str, str] | None:
    """``lora_unet_x.hada_w1_a`` -> (``lora_unet_x``, ``hada_w1_a``); None for a key with no known suffix."""
    for suffix in SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def unsupported_kind(key: str, ndim: int | None = None) -> str | None:
    """The adapter kind a tensor name belongs to when lorakit does not read that kind. LyCORIS stores OFT and
    BOFT under the same name, ``oft_blocks``: [blocks, size, size] for OFT, [m, blocks, size, size] for BOFT."""
    if key.endswith(".oft_blocks") and ndim == 4:
        return "BOFT"
    return next((kind for frag, kind in UNSUPPORTED.items() if frag in key), None)


def module_type_of(parts: dict) -> type:
    """The class that reads a layer with these suffixes (LoRA when only ``alpha`` is present)."""
    for cls in (LohaModule, LokrModule, LoraModule):
        if any(s in parts for s in cls.suffixes if s != "alpha"):
            return cls
    return LoraModule
