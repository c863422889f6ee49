"""Reading the adapter files people share into lorakit module keys and adapter-type modules.

Formats (each layer gives the same delta as the tool that wrote it):

* kohya / A1111 / LyCORIS keys ``lora_unet_*``, ``lora_te_*``, ``lora_te1_*``, ``lora_te2_*`` with diffusers names
  or SAI / LDM names (:mod:`lorakit.adapters.keys`), and per-layer tensors of any type in
  :data:`lorakit.adapters.registry.MODULE_TYPES` (LoRA / LoCon ``lora_down``/``lora_up``/``alpha``, LoHa
  ``hada_*``, LoKr ``lokr_*``);
* peft / diffusers keys ``[unet.|text_encoder.|text_encoder_2.|base_model.model.]<path>.lora_A[.name].weight`` /
  ``lora_B``, with alpha from diffusers' ``lora_adapter_metadata`` header (``save_lora_weights(...,
  unet_lora_adapter_metadata=LoraConfig(...).to_dict())``), from peft's ``adapter_config.json`` next to the file,
  or from ``<path>.alpha`` tensors; without any of them alpha = rank (what diffusers assumes too).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.adapters.keys import (
    UnplacedKeyError,
    is_sai_name,
    kernel_hint,
    module_path_from_kohya,
    sai_names_to_module_keys,
)
from lorakit.adapters.lora import LoraModule
from lorakit.adapters.registry import module_type_of, split_layer_key, unsupported_kind

EXTRA_PREFIXES = ("edlora_emb.",)  # tensors that are not layers (ED-LoRA embeddings)
_KOHYA_PREFIX = re.compile(r"^(?:lora_(?:unet|te|te1|te2)_|lycoris_)")
_PEFT_RE = re.compile(
    r"^(?:base_model\.model\.)?(?:(unet|text_encoder|text_encoder_2)\.)?(.+?)\.(lora_A|lora_B)(?:\.[\w-]+)?\.weight$"
)
_PEFT_ALPHA_RE = re.compile(r"^(?:(unet|text_encoder|text_encoder_2)\.)?(.+)\.alpha$")
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


class FormatError(ValueError):
    """A file, or a key in it, that lorakit cannot place."""


@dataclass
class Layers:
    modules: dict
    extra: dict[str, torch.Tensor]
    format: str


def guess_format(keys) -> str:
    keys = list(keys)
    kohya = [k for k in keys if _KOHYA_PREFIX.match(k)]
    if kohya:
        kinds = [name for name, frag in (("LoHa", ".hada_"), ("LoKr", ".lokr_")) if any(frag in k for k in kohya)]
        names = "SAI/LDM names" if any(is_sai_name(k.split(".")[0]) for k in kohya) else "diffusers names"
        return f"kohya/LyCORIS {'+'.join(kinds) or 'LoRA/LoCon'} ({names})"
    if any(_PEFT_RE.match(k) for k in keys):
        return "peft/diffusers LoRA"
    return "unknown"


def read_layers(tensors: dict[str, torch.Tensor], meta: dict[str, str], source: str | Path,
                layers_per_block: int = 2) -> Layers:
    """Group a file's tensors into ``{module key: AdapterModule}`` plus extra tensors.

    Args:
        layers_per_block: the base UNet's ``layers_per_block`` (2 for SD1/SD2/SDXL), used to renumber SAI names.
    Raises:
        FormatError naming the first key that cannot be placed and the guessed format, or the adapter kind
        of a layer type lorakit does not read (OFT, BOFT, DoRA, ...).
    """
    fmt = guess_format(tensors)
    for key, value in tensors.items():
        kind = unsupported_kind(key, value.ndim)
        if kind and not key.startswith(EXTRA_PREFIXES):
            raise FormatError(f"{source}: {kind} adapters are not supported (key {key!r}); lorakit reads LoRA, "
                              "LoCon, LoHa and LoKr")
    kohya: dict[str, dict[str, torch.Tensor]] = {}
    peft: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.startswith(EXTRA_PREFIXES):
            extra[key] = value
            continue
        if _KOHYA_PREFIX.match(key):
            split = split_layer_key(key)
            if split is None:
                raise FormatError(f"{source}: cannot place key {key!r} (format guessed: {fmt}): unknown tensor name")
            kohya.setdefault(split[0], {})[split[1]] = value
            continue
        m = _PEFT_RE.match(key)
        if m:
            peft.setdefault(f"{m.group(1) or 'unet'}.{m.group(2)}", {})[m.group(3)] = value
            continue
        m = _PEFT_ALPHA_RE.match(key)
        if m and value.numel() == 1:
            peft.setdefault(f"{m.group(1) or 'unet'}.{m.group(2)}", {})["alpha"] = value
            continue
        if "lora" in key.lower() or split_layer_key(key) is not None:
            raise FormatError(f"{source}: cannot place key {key!r} (format guessed: {fmt})")
        extra[key] = value
    modules = _kohya_modules(kohya, source, fmt, layers_per_block)
    modules.update(_peft_modules(peft, meta, Path(source), fmt))
    if not modules:
        raise FormatError(f"{source}: no adapter weights found (format guessed: {fmt}; expected kohya lora_down/"
                          "lora_up, LyCORIS hada_*/lokr_* or peft lora_A/lora_B keys)")
    return Layers(modules, extra, fmt)


def _kohya_modules(groups: dict, source, fmt: str, layers_per_block: int) -> dict:
    sai = [n for n in groups if is_sai_name(n)]
    try:
        keys = sai_names_to_module_keys(sai, layers_per_block) if sai else {}
        keys.update({n: module_path_from_kohya(n) for n in groups if n not in keys})
    except UnplacedKeyError as err:
        raise FormatError(f"{source}: {err} (format guessed: {fmt})") from err
    out = {}
    for name, parts in groups.items():
        key = keys[name]
        if key in out:
            raise FormatError(f"{source}: layers {name!r} and another one both map to {key} (format guessed: {fmt})")
        cls = module_type_of(parts)
        try:
            out[key] = cls.from_parts(parts, kernel=kernel_hint(key))
        except KeyError as err:
            raise FormatError(f"{source}: layer {name!r} has {sorted(parts)}: {err.args[0]} "
                              f"(format guessed: {fmt})") from err
    return out


def peft_alpha_config(meta: dict[str, str], source: Path) -> dict[str, dict]:
    """Per component, the peft LoRA settings that decide alpha: ``{"unet": {"lora_alpha": 8, ...}}``.

    From diffusers' ``lora_adapter_metadata`` header (keys ``unet.lora_alpha``, ``unet.alpha_pattern``, ...) or
    from a peft ``adapter_config.json`` beside the file (applies to every component).
    """
    out: dict[str, dict] = {}
    raw = meta.get(DIFFUSERS_METADATA_KEY)
    if raw:
        for key, value in json.loads(raw).items():
            comp, _, field_ = key.partition(".")
            out.setdefault(comp, {})[field_] = value
    sidecar = source.parent / "adapter_config.json"
    if not out and sidecar.is_file():
        cfg = json.loads(sidecar.read_text())
        out = {comp: cfg for comp in ("unet", "text_encoder", "text_encoder_2")}
    return out


def _alpha(cfg: dict | None, path: str, rank: int) -> float:
    if not cfg:
        return float(rank)
    from peft.utils.other import get_pattern_key

    patterns = cfg.get("alpha_pattern") or {}
    key = get_pattern_key(list(patterns), path)
    alpha = float(patterns[key]) if key in patterns else float(cfg.get("lora_alpha", rank))
    if cfg.get("use_rslora"):
        alpha = alpha * rank ** 0.5  # rsLoRA scales by alpha / sqrt(r); stored so that alpha / r is that scale
    return alpha


def _peft_modules(groups: dict, meta: dict, source: Path, fmt: str) -> dict:
    if not groups:
        return {}
    configs = peft_alpha_config(meta, source)
    out = {}
    for key, parts in groups.items():
        if "lora_A" not in parts or "lora_B" not in parts:
            raise FormatError(f"{source}: module {key} has {sorted(parts)} but needs both lora_A and lora_B "
                              f"(format guessed: {fmt})")
        down, up = parts["lora_A"], parts["lora_B"]
        comp, path = key.split(".", 1)
        alpha = float(parts["alpha"]) if "alpha" in parts else _alpha(configs.get(comp), path, down.shape[0])
        out[_with_text_model(comp, path)] = LoraModule(down=down, up=up, alpha=alpha)
    return out


def _with_text_model(comp: str, path: str) -> str:
    """A text-encoder layer as lorakit names it: diffusers saves under transformers 5 without the
    ``text_model.`` level (``text_encoder.encoder.layers.0...``), under transformers 4 with it."""
    if comp.startswith("text_encoder") and not path.startswith(("text_model.", "text_projection")):
        path = "text_model." + path
    return f"{comp}.{path}"
