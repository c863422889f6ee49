"""Layer names in shared files <-> lorakit module keys (``unet.down_blocks.0.attentions.0.proj_in``).

Three spellings of a UNet layer exist in the wild:

* kohya with diffusers names, ``lora_unet_down_blocks_0_attentions_0_proj_in`` (kohya's SD1/SD2 files, lorakit's
  SD1/SD2 files, and its SDXL files with ``key_style="diffusers"``);
* kohya with SAI / LDM names, ``lora_unet_input_blocks_1_1_proj_in`` (kohya's SDXL files: sd-scripts trains
  SDXL on the original UNet layout); read through diffusers' own converter
  (``diffusers.loaders.lora_conversion_utils``), written by :func:`sai_unet_path`, which that converter inverts
  (tested on every layer of the SD1 and SDXL layouts);
* peft / diffusers, ``unet.down_blocks.0.attentions.0.proj_in.lora_A.weight`` (handled in :mod:`io`).

Text encoders are ``lora_te_`` (SD1/SD2) or ``lora_te1_`` / ``lora_te2_`` (SDXL) + the transformers path.
"""

from __future__ import annotations

import re

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KEY_STYLES = ("auto", "diffusers", "sai")

# Identifiers that contain "_" in diffusers / transformers module paths; everything else splits on "_".
_COMPOUNDS = sorted(
    (
        tuple(w.split("_"))
        for w in (
            "down_blocks up_blocks mid_block transformer_blocks proj_in proj_out to_q to_k to_v to_out "
            "conv_shortcut time_emb_proj text_model self_attn q_proj k_proj v_proj out_proj conv_in conv_out "
            "time_embedding add_embedding linear_1 linear_2 conv_norm_out final_layer_norm text_projection "
            "add_q_proj add_k_proj add_v_proj to_add_out"
        ).split()
    ),
    key=len,
    reverse=True,
)
_PREFIXES = (("lora_unet_", "unet"), ("lora_te2_", "text_encoder_2"), ("lora_te1_", "text_encoder"),
             ("lora_te_", "text_encoder"), ("lycoris_", "unet"))  # lycoris_: LyCORIS on a diffusers UNet (SimpleTuner)
_SAI_WORDS = ("input_blocks", "middle_block", "output_blocks", "time_embed_", "label_emb_")
# Convolutions with a 3x3 kernel in SD / SDXL UNets (their flattened LoHa / LoKr factors need the kernel back).
_KERNEL3_LEAVES = ("conv1", "conv2", "conv", "conv_in", "conv_out")


class UnplacedKeyError(ValueError):
    """A layer name that cannot be placed."""


def kohya_prefix(component: str, arch: str) -> str:
    """kohya key prefix of a pipeline component for an architecture."""
    if component == "unet":
        return "lora_unet_"
    if component == "text_encoder":
        return "lora_te1_" if arch == "sdxl" else "lora_te_"
    if component == "text_encoder_2":
        return "lora_te2_"
    raise ValueError(f"unknown pipeline component {component!r}; expected one of {COMPONENTS}")


def kohya_name(module_key: str, arch: str, key_style: str = "diffusers") -> str:
    """``unet.down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``
    (``key_style="sai"``, SDXL UNet layers: ``lora_unet_input_blocks_1_1_proj_in``)."""
    comp, path = module_key.split(".", 1)
    if key_style == "sai" and comp == "unet":
        path = sai_unet_path(path, arch)
    return kohya_prefix(comp, arch) + path.replace(".", "_")


def is_sai_name(name: str) -> bool:
    return name.startswith("lora_unet_") and (
        any(w in name for w in _SAI_WORDS) or name == "lora_unet_out_2"
    )


def module_path_from_kohya(name: str) -> str:
    """Inverse of the kohya naming for diffusers/transformers paths: ``lora_unet_mid_block_attentions_0_proj_in``
    -> ``unet.mid_block.attentions.0.proj_in``.

    Raises:
        UnplacedKeyError for a prefix that is none of lora_unet_, lora_te_, lora_te1_, lora_te2_, lycoris_.
    """
    for prefix, comp in _PREFIXES:
        if name.startswith(prefix):
            words = name[len(prefix) :].split("_")
            break
    else:
        raise UnplacedKeyError(f"key {name!r} has no kohya prefix (lora_unet_, lora_te_, lora_te1_, lora_te2_)")
    parts, i = [], 0
    while i < len(words):
        for comp_words in _COMPOUNDS:
            n = len(comp_words)
            if tuple(words[i : i + n]) == comp_words:
                parts.append("_".join(comp_words))
                i += n
                break
        else:
            parts.append(words[i])
            i += 1
    return comp + "." + ".".join(parts)


class _UnetConfig(dict):
    __getattr__ = dict.get


def sai_names_to_module_keys(names: list[str], layers_per_block: int = 2) -> dict[str, str]:
    """kohya SAI / LDM UNet layer names -> lorakit module keys, through diffusers' converter.

    diffusers renumbers the LDM blocks (``_maybe_map_sgm_blocks_to_diffusers``), renames the leaves
    (``_convert_non_diffusers_lora_to_diffusers``) and maps to peft names (``convert_unet_state_dict_to_peft``);
    the names are passed as one-element placeholder tensors, whatever the layer's adapter type.

    Raises:
        UnplacedKeyError naming the first name diffusers could not convert.
    """
    import torch
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    out: dict[str, str] = {}
    for name in names:  # one at a time: each converted key must be traced back to its name
        probe = {f"{name}.lora_down.weight": torch.zeros(1), f"{name}.lora_up.weight": torch.zeros(1)}
        try:
            mapped = _maybe_map_sgm_blocks_to_diffusers(probe, _UnetConfig(layers_per_block=layers_per_block))
            converted, _ = _convert_non_diffusers_lora_to_diffusers(mapped)
            peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
        except Exception as err:  # noqa: BLE001 - diffusers raises ValueError/IndexError for names it cannot place
            raise UnplacedKeyError(f"cannot place layer {name!r}: diffusers' SAI/LDM converter failed ({err})") from err
        downs = [k for k in peft if k.endswith(".lora_A.weight")]
        if len(downs) != 1:
            raise UnplacedKeyError(f"cannot place layer {name!r}: diffusers' SAI/LDM converter gave {sorted(peft)}")
        out[name] = "unet." + downs[0].removesuffix(".lora_A.weight")
    return out


def kernel_hint(module_key: str) -> tuple[int, int] | None:
    """(3, 3) for the UNet layers that are 3x3 convolutions in SD / SDXL, else None (Linear or 1x1 conv)."""
    if module_key.startswith("unet.") and module_key.rsplit(".", 1)[-1] in _KERNEL3_LEAVES:
        return (3, 3)
    return None


# ------------------------------------------------------------------------------------- diffusers -> SAI (writer)

_RESNET_LEAVES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
              "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
# up blocks that hold attentions (decides whether an upsampler is LDM sub-layer 1 or 2)
UP_ATTENTION = {"sd1": {1, 2, 3}, "sd2": {1, 2, 3}, "sdxl": {0, 1}}


def _resnet_leaf(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in _RESNET_LEAVES:
        raise UnplacedKeyError(f"resnet layer {rest!r} has no SAI/LDM name")
    return _RESNET_LEAVES[head] + ("." + tail if tail else "")


def sai_unet_path(path: str, arch: str, layers_per_block: int = 2) -> str:
    """A diffusers UNet module path in the original (SAI / LDM) UNet's naming, as kohya's SDXL files use it.

    ``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in`` (SDXL, 2 layers per block).
    """
    if path in _TOP_LEVEL:
        return _TOP_LEVEL[path]
    L = layers_per_block
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$", path)
    if m:
        side, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "down_blocks":
            if kind == "downsamplers":
                return f"input_blocks.{(b + 1) * (L + 1)}.0.{rest.replace('conv', 'op', 1)}"
            block = f"input_blocks.{1 + b * (L + 1) + j}"
        else:
            if kind == "upsamplers":
                sub = 2 if b in UP_ATTENTION[arch] else 1
                return f"output_blocks.{b * (L + 1) + L}.{sub}.{rest}"
            block = f"output_blocks.{b * (L + 1) + j}"
        return f"{block}.0.{_resnet_leaf(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * j}.{_resnet_leaf(rest)}"
    raise UnplacedKeyError(f"UNet layer {path!r} has no SAI/LDM name")
