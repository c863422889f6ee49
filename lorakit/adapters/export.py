"""Writing adapters for other tools: diffusers / peft files with their alpha metadata.

kohya / A1111 / ComfyUI / LyCORIS files are written by :func:`lorakit.adapters.io.save_adapter`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch

from lorakit.adapters.formats import DIFFUSERS_METADATA_KEY
from lorakit.adapters.io import COMPONENTS, Adapter, AdapterError
from lorakit.adapters.lora import LoraModule
from lorakit.fileio import save_safetensors


def peft_metadata(modules: dict[str, LoraModule]) -> dict:
    """peft ``LoraConfig`` fields for one component: the commonest rank / alpha, patterns for the others.

    Module names drop CLIP's ``text_model.`` level: peft matches names and patterns as suffixes, so
    ``encoder.layers.0.self_attn.q_proj`` finds the layer in transformers 4 (with the level) and 5 (without).
    """
    modules = {p.removeprefix("text_model."): m for p, m in modules.items()}
    ranks = {p: m.rank for p, m in modules.items()}
    alphas = {p: float(m.alpha) for p, m in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(modules),
            "rank_pattern": {p: v for p, v in ranks.items() if v != r},
            "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha}}


def save_diffusers_adapter(adapter: Adapter, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``unet.<path>.lora_A.weight`` / ``lora_B`` keys (what ``save_lora_weights`` writes) with diffusers'
    ``lora_adapter_metadata`` header.

    Each layer's scale ``alpha / rank`` is folded into ``lora_B`` and the header says ``lora_alpha = r``: the
    delta is then ``lora_B @ lora_A`` in every reader, including those that ignore the header (ComfyUI).

    Raises:
        AdapterError for layers that are not LoRA (convert LoHa / LoKr with their exact LoRA form first).
    """
    others = sorted({m.kind for m in adapter.modules.values() if not isinstance(m, LoraModule)})
    if others:
        raise AdapterError(f"diffusers / peft LoRA files hold LoRA layers only; this adapter has {others} layers "
                           "(use --as-lora for their exact LoRA form)")
    tensors, meta = {}, {}
    for comp in COMPONENTS:
        mods = adapter.component(comp)
        if not mods:
            continue
        mods = {p: LoraModule(m.down, (m.up.float() * m.scale).to(m.up.dtype), float(m.rank)) for p, m in mods.items()}
        for p, m in mods.items():
            down, up = (m.down, m.up) if dtype is None else (m.down.to(dtype), m.up.to(dtype))
            tensors[f"{comp}.{p}.lora_A.weight"], tensors[f"{comp}.{p}.lora_B.weight"] = down, up
        meta.update({f"{comp}.{k}": v for k, v in peft_metadata(mods).items()})
    header = {k: v for k, v in adapter.metadata.items() if k.startswith(("lorakit.", "ss_"))}
    header.setdefault("lorakit.format", "1")
    header.update({"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(meta, sort_keys=True)})
    tensors.update(adapter.extra)
    return save_safetensors(tensors, path, header)
