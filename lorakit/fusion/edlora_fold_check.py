"""How closely a model's cross-attention keys / values follow an ED-LoRA reference (the fold's objective,
measured on any prompts): tests and tools/measure_edlora_fold.py."""

from __future__ import annotations

import torch

from lorakit.adapters.edlora import cross_attention_layers, layer_hidden_states
from lorakit.fusion.edlora_fold import plain_features, row_pairs


def kv_outputs(pipe, prompts: list[str]) -> list[torch.Tensor]:
    """Per cross-attention layer (down -> mid -> up), ``[B, S, out_k + out_v]``: the keys and values it computes
    for ``prompts`` (ED-LoRA pipelines: from each layer's own features; others: from the plain features)."""
    layers = cross_attention_layers(pipe.unet)
    with torch.no_grad():
        if getattr(pipe, "_lorakit_edlora", None) is not None:
            feats = layer_hidden_states(pipe, prompts)
        else:
            feats = plain_features(pipe, prompts).expand(len(layers), -1, -1, -1)
        out = []
        for l, path in enumerate(layers):
            attn = pipe.unet.get_submodule(path)
            out.append(torch.cat([attn.to_k(feats[l]), attn.to_v(feats[l])], -1).double())
    return out


def kv_gap(model, model_prompts: list[str], ref, ref_prompts: list[str]) -> float:
    """Mean squared difference of the keys / values of ``model`` on ``model_prompts`` and ``ref`` on
    ``ref_prompts`` (same number of prompts), over every layer and aligned token row (:func:`row_pairs`)."""
    got, want = kv_outputs(model, model_prompts), kv_outputs(ref, ref_prompts)
    eos = model.tokenizer.eos_token_id
    ids_m = model.tokenizer(model_prompts, padding="max_length", max_length=model.tokenizer.model_max_length,
                            truncation=True).input_ids
    ids_r = ref.tokenizer(ref_prompts, padding="max_length", max_length=ref.tokenizer.model_max_length,
                          truncation=True).input_ids
    total, count = 0.0, 0
    for b in range(len(model_prompts)):
        rm, rr = row_pairs(ids_m[b], ids_r[b], eos)
        for g, w in zip(got, want):
            total += float(((g[b, rm] - w[b, rr]) ** 2).sum())
            count += len(rm) * g.shape[-1]
    return total / max(count, 1)
