"""A diffusers SD1 / SDXL pipeline as one original-layout (LDM / SAI) ``.safetensors`` checkpoint.

The layout A1111, ComfyUI, kohya sd-scripts and diffusers' ``from_single_file`` load:

* UNet: ``model.diffusion_model.<LDM path>`` (:func:`lorakit.adapters.keys.sai_unet_path`);
* VAE: ``first_stage_model.<LDM path>`` (mid-block attention as 1x1 convolutions);
* SD1 text encoder: ``cond_stage_model.transformer.text_model.*``; SDXL: the first (CLIP-L) encoder under
  ``conditioner.embedders.0.transformer.text_model.*``, the second (OpenCLIP bigG) under
  ``conditioner.embedders.1.model.*`` in OpenCLIP names (q/k/v fused into ``in_proj``, projection transposed).

Each mapping is tested by converting back with diffusers' own single-file converters.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from lorakit.adapters.keys import sai_unet_path
from lorakit.conditioning import pipeline_arch
from lorakit.fileio import save_safetensors

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def unet_to_ldm(state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        module, param = _param(key)
        out[f"model.diffusion_model.{sai_unet_path(module, arch)}.{param}"] = value
    return out


def _vae_path(module: str, n_up: int) -> str:
    m = re.match(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$",
                 module)
    if m:
        side, blocks, i, kind, j, rest = m.groups()
        i = int(i) if blocks == "down_blocks" else n_up - 1 - int(i)
        level = f"{side}.{'down' if blocks == 'down_blocks' else 'up'}.{i}"
        if kind == "resnets":
            return f"{level}.block.{j}.{_VAE_RESNET.get(rest, rest)}"
        return f"{level}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{rest}"
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", module)
    if m:
        side, kind, j, rest = m.groups()
        if kind == "resnets":
            return f"{side}.mid.block_{int(j) + 1}.{_VAE_RESNET.get(rest, rest)}"
        return f"{side}.mid.attn_1.{_VAE_ATTENTION[rest]}"
    return module.replace("conv_norm_out", "norm_out")


def vae_to_ldm(state: dict[str, torch.Tensor], n_up_blocks: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        module, param = _param(key)
        path = _vae_path(module, n_up_blocks)
        if ".mid.attn_1." in path and param == "weight" and value.dim() == 2 and not path.endswith(".norm"):
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[f"first_stage_model.{path}.{param}"] = value
    return out


def _with_text_model(key: str) -> str:
    """transformers >= 5 CLIPTextModel state dicts have no ``text_model.`` level; the LDM layout has it."""
    return key if key.startswith(("text_model.", "text_projection")) else "text_model." + key


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + _with_text_model(k): v for k, v in state.items() if not k.endswith("position_ids")}


_OPENCLIP_LEAVES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection -> OpenCLIP names (SDXL's second text encoder)."""
    state = {_with_text_model(k): v for k, v in state.items() if not k.endswith("position_ids")}
    out = {prefix + "token_embedding.weight": state.pop("text_model.embeddings.token_embedding.weight"),
           prefix + "positional_embedding": state.pop("text_model.embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": state.pop("text_model.final_layer_norm.weight"),
           prefix + "ln_final.bias": state.pop("text_model.final_layer_norm.bias"),
           prefix + "text_projection": state.pop("text_projection.weight").T.contiguous()}
    layers = sorted({int(m.group(1)) for k in state for m in [re.match(r"text_model\.encoder\.layers\.(\d+)\.", k)] if m})
    for i in layers:
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{param}"] = torch.cat(
                [state.pop(f"{src}self_attn.{p}_proj.{param}") for p in ("q", "k", "v")], 0)
            for old, new in _OPENCLIP_LEAVES.items():
                out[f"{dst}{new}.{param}"] = state.pop(f"{src}{old}.{param}")
    if state:
        raise ValueError(f"OpenCLIP layout has no place for {sorted(state)[:3]}")
    return out


def pipeline_to_ldm(pipe, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The original-layout state dict of an SD1 or SDXL pipeline (CPU tensors, ``dtype`` if given).

    Raises:
        ValueError for SD2 (its OpenCLIP-H text encoder layout is not written) and other architectures, and for
        pipelines whose tokenizer gained tokens (fused ED-LoRA concepts): a checkpoint holds no tokenizer and the
        tools that open it have no per-layer routing, so those pseudo-words could not be used.
    """
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        if tok is not None and len(tok) > tok.vocab_size:
            added = sorted(t for t, i in tok.get_added_vocab().items() if i >= tok.vocab_size)
            raise ValueError(f"the pipeline's {name} has {len(tok) - tok.vocab_size} added tokens ({added[:3]}...): a "
                             "single-file checkpoint cannot carry them (ED-LoRA concepts need lorakit's tokenizer and "
                             "per-layer routing); fold them into plain words with "
                             "--fold-concepts (docs/edlora.md) or write --out-format pipeline")
    arch = pipeline_arch(pipe)
    if arch not in ("sd1", "sdxl"):
        raise ValueError(f"single-file checkpoints are written for SD1 and SDXL pipelines; this one is {arch} "
                         "(write a diffusers folder with --out-format pipeline)")
    sd = dict(unet_to_ldm(pipe.unet.state_dict(), arch))
    sd.update(vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.up_block_types)))
    if arch == "sd1":
        sd.update(clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    else:
        sd.update(clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        sd.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    return {k: (v.detach().to("cpu") if dtype is None else v.detach().to("cpu", dtype)) for k, v in sd.items()}


def save_single_file(pipe, path: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write :func:`pipeline_to_ldm` to one ``.safetensors`` file, atomically."""
    return save_safetensors(pipeline_to_ldm(pipe, dtype), path, metadata)
