"""Adapter files: kohya-named ``.safetensors`` with lorakit metadata; conversion to and from peft.

On disk (DESIGN.md): ``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``;
``lora_te_`` (SD1/SD2 text encoder) or ``lora_te1_`` / ``lora_te2_`` (SDXL). AUTOMATIC1111, ComfyUI and
``diffusers.load_lora_weights`` load these files as they are.

In memory an adapter is an :class:`Adapter`: ``{module key: LoraModule}`` where a module key is the module's
path prefixed by its pipeline component (``unet.down_blocks.0.attentions.0.proj_in``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``, ``text_encoder_2....``), plus metadata and
any extra tensors (ED-LoRA embeddings).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.fileio import load_safetensors, save_safetensors

FORMAT_VERSION = "1"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

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


class AdapterError(ValueError):
    """An adapter file that cannot be read, or that does not fit a base model."""


@dataclass
class LoraModule:
    """One adapted layer: ``delta = (alpha / rank) * up @ down``.

    Shapes: Linear ``down [r, in]``, ``up [out, r]``; Conv2d (LoCon) ``down [r, in, kh, kw]``, ``up [out, r, 1, 1]``.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    def delta(self) -> torch.Tensor:
        """The weight change: ``[out, in]`` for Linear, ``[out, in, kh, kw]`` for Conv2d (float32)."""
        down, up = self.down.float(), self.up.float()
        if self.is_conv:
            d = up.flatten(1) @ down.flatten(1)
            return self.scale * d.reshape(up.shape[0], *down.shape[1:])
        return self.scale * (up @ down)


@dataclass
class Adapter:
    """A LoRA / LoCon / ED-LoRA adapter in memory."""

    modules: dict[str, LoraModule] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def arch(self) -> str | None:
        return self.metadata.get("lorakit.base_arch") or guess_arch(self)

    @property
    def kind(self) -> str:
        if "lorakit.kind" in self.metadata:
            return self.metadata["lorakit.kind"]
        return "locon" if any(m.is_conv and m.down.shape[-1] > 1 for m in self.modules.values()) else "lora"

    def component(self, name: str) -> dict[str, LoraModule]:
        """The modules of one pipeline component, keyed by their path inside it."""
        prefix = name + "."
        return {k[len(prefix) :]: v for k, v in self.modules.items() if k.startswith(prefix)}

    def num_parameters(self) -> int:
        return sum(m.down.numel() + m.up.numel() for m in self.modules.values())


def kohya_prefix(component: str, arch: str) -> str:
    """kohya key prefix of a pipeline component for an architecture."""
    if component == "unet":
        return "lora_unet_"
    if component == "text_encoder":
        return "lora_te1_" if arch == "sdxl" else "lora_te_"
    if component == "text_encoder_2":
        return "lora_te2_"
    raise ValueError(f"unknown pipeline component {component!r}; expected one of {COMPONENTS}")


def kohya_name(module_key: str, arch: str) -> str:
    """``unet.down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    comp, path = module_key.split(".", 1)
    return kohya_prefix(comp, arch) + path.replace(".", "_")


def module_path_from_kohya(name: str) -> str:
    """Inverse of the kohya naming for diffusers/transformers paths: ``lora_unet_mid_block_attentions_0_proj_in``
    -> ``unet.mid_block.attentions.0.proj_in``.

    Raises:
        AdapterError for a prefix that is none of lora_unet_, lora_te_, lora_te1_, lora_te2_.
    """
    for prefix, comp in (
        ("lora_unet_", "unet"),
        ("lora_te2_", "text_encoder_2"),
        ("lora_te1_", "text_encoder"),
        ("lora_te_", "text_encoder"),
    ):
        if name.startswith(prefix):
            words = name[len(prefix) :].split("_")
            break
    else:
        raise AdapterError(f"key {name!r} has no kohya prefix (lora_unet_, lora_te_, lora_te1_, lora_te2_)")
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


def adapter_metadata(
    arch: str,
    kind: str,
    blocks: dict | None = None,
    trigger: str | None = None,
    config: dict | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    **extra: str,
) -> dict[str, str]:
    """The header metadata of DESIGN.md (all values strings)."""
    meta = {"lorakit.format": FORMAT_VERSION, "lorakit.kind": kind, "lorakit.base_arch": arch}
    if blocks is not None:
        meta["lorakit.blocks"] = json.dumps(blocks)
    if trigger:
        meta["lorakit.trigger"] = trigger
    if config is not None:
        meta["lorakit.config"] = json.dumps(config, default=str)
    if rank is not None:
        meta["ss_network_dim"] = str(rank)
    if alpha is not None:
        meta["ss_network_alpha"] = str(alpha)
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


def save_adapter(adapter: Adapter, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write an adapter as a kohya-named safetensors file with its metadata, atomically.

    Args:
        adapter: modules keyed by component path; ``metadata['lorakit.base_arch']`` decides te prefixes.
        dtype: store weights in this dtype (e.g. ``torch.float16``); default keeps each tensor's dtype.
    """
    arch = adapter.metadata.get("lorakit.base_arch") or guess_arch(adapter) or "sd1"
    tensors: dict[str, torch.Tensor] = {}
    for key, mod in adapter.modules.items():
        name = kohya_name(key, arch)
        tensors[f"{name}.lora_down.weight"] = mod.down if dtype is None else mod.down.to(dtype)
        tensors[f"{name}.lora_up.weight"] = mod.up if dtype is None else mod.up.to(dtype)
        tensors[f"{name}.alpha"] = torch.tensor(float(mod.alpha))
    for key, value in adapter.extra.items():
        tensors[key] = value
    meta = dict(adapter.metadata)
    meta.setdefault("lorakit.format", FORMAT_VERSION)
    meta.setdefault("lorakit.base_arch", arch)
    meta.setdefault("lorakit.kind", adapter.kind)
    return save_safetensors(tensors, path, meta)


_KOHYA_RE = re.compile(r"^(lora_(?:unet|te|te1|te2)_.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT_RE = re.compile(r"^(?:(unet|text_encoder|text_encoder_2)\.)?(.+?)\.(lora_A|lora_B)(?:\.[\w-]+)?\.weight$")
_LYCORIS_OTHER = ("hada_w1", "lokr_w1", "oft_blocks", ".dora_scale", "lokr_w1_a")


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read an adapter file: lorakit/kohya files, kohya LDM-named files (via diffusers' converter) and
    peft/diffusers-format LoRA files.

    Raises:
        FileNotFoundError; AdapterError naming the file for truncated files, unsupported adapter types
        (LoHa, LoKr, OFT, DoRA) and files without LoRA weights.
    """
    path = Path(path)
    tensors, meta = load_safetensors(path)
    if any(marker in k for k in tensors for marker in _LYCORIS_OTHER):
        raise AdapterError(f"{path}: LyCORIS LoHa/LoKr/OFT/DoRA adapters are not supported, only LoRA and LoCon")
    if any(k.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks", "lora_unet_middle_block")) for k in tensors):
        tensors = _ldm_to_diffusers_names(path, tensors, meta)
    adapter = Adapter(metadata=meta)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _KOHYA_RE.match(key)
        if m:
            groups.setdefault(module_path_from_kohya(m.group(1)), {})[m.group(2).split(".")[0]] = value
            continue
        m = _PEFT_RE.match(key)
        if m:
            comp = m.group(1) or "unet"
            part = "lora_down" if m.group(3) == "lora_A" else "lora_up"
            groups.setdefault(f"{comp}.{m.group(2)}", {})[part] = value
            continue
        adapter.extra[key] = value
    for key, parts in groups.items():
        if "lora_down" not in parts or "lora_up" not in parts:
            raise AdapterError(f"{path}: module {key} has {sorted(parts)} but needs both lora_down and lora_up")
        down, up = parts["lora_down"], parts["lora_up"]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        adapter.modules[key] = LoraModule(down=down, up=up, alpha=alpha)
    if not adapter.modules:
        raise AdapterError(f"{path}: no LoRA weights found (expected kohya lora_down/lora_up or peft lora_A/lora_B keys)")
    check_finite(adapter, path)
    return adapter


def check_finite(adapter: Adapter, path) -> None:
    """Refuse an adapter holding NaN/inf: merged, fused or sampled it would only give NaN weights or black
    images. Raises AdapterError naming the file and the first bad tensor."""
    for key, mod in adapter.modules.items():
        for part, t in (("lora_down", mod.down), ("lora_up", mod.up)):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise AdapterError(f"{path}: {key}.{part} holds NaN/inf values (a diverged training or a damaged "
                                   "file); lorakit does not use it")
        if not math.isfinite(mod.alpha):
            raise AdapterError(f"{path}: {key}.alpha is {mod.alpha}; lorakit does not use it")
    for key, t in adapter.extra.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise AdapterError(f"{path}: {key} holds NaN/inf values; lorakit does not use it")


def _ldm_to_diffusers_names(path: Path, tensors: dict, meta: dict) -> dict:
    """Rename kohya LDM-style UNet keys (input_blocks/middle_block/output_blocks) to diffusers paths."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    unet_cfg = _LDM_UNET_CONFIG["sdxl" if any(k.startswith("lora_te2_") for k in tensors) else "sd1"]
    try:
        return _maybe_map_sgm_blocks_to_diffusers(dict(tensors), unet_cfg)
    except Exception as err:  # noqa: BLE001
        raise AdapterError(f"{path}: could not map LDM block names to diffusers names: {err}") from err


class _Cfg(dict):
    __getattr__ = dict.get


_LDM_UNET_CONFIG = {"sd1": _Cfg(layers_per_block=2), "sdxl": _Cfg(layers_per_block=2)}


def guess_arch(adapter: Adapter) -> str | None:
    """Architecture from the keys alone: text_encoder_2 or 3 UNet levels -> sdxl; 4 levels -> sd1/sd2."""
    keys = adapter.modules.keys()
    if any(k.startswith("text_encoder_2.") for k in keys):
        return "sdxl"
    levels = {int(m.group(1)) for k in keys for m in [re.match(r"unet\.(?:down|up)_blocks\.(\d+)\.", k)] if m}
    if not levels:
        return None
    if max(levels) == 3:
        for k, mod in adapter.modules.items():
            if k.endswith("attn2.to_k") and mod.down.shape[1] == 1024:
                return "sd2"
        return "sd1"
    if max(levels) == 2 and any(k.startswith("unet.down_blocks.2.attentions") for k in keys):
        return "sdxl"
    return None


# ----------------------------------------------------------------------------------------------- peft bridge


def live_path(model: torch.nn.Module, path: str) -> str:
    """The module path inside a live model for a file path.

    Files use kohya's CLIP names (``text_model.encoder.layers.0...``); transformers >= 5 CLIP text models have no
    ``text_model`` wrapper, so the prefix is dropped where the model lacks it.
    """
    if path.startswith("text_model.") and not hasattr(model, "text_model"):
        return path[len("text_model.") :]
    return path


def file_path(model: torch.nn.Module, component: str, path: str) -> str:
    """Inverse of :func:`live_path`: the file path of a live module path."""
    if component.startswith("text_encoder") and not path.startswith("text_model."):
        return "text_model." + path
    return path


def from_peft(model: torch.nn.Module, component: str, adapter_name: str = "default") -> dict[str, LoraModule]:
    """Read one peft adapter out of a model, exactly (detached copies of lora_A / lora_B, and alpha).

    Args:
        model: a UNet or text encoder with peft LoRA layers (``add_adapter`` / ``inject_adapter_in_model``).
        component: ``unet``, ``text_encoder`` or ``text_encoder_2`` (prefix of the returned keys).
    Returns:
        ``{component.module_path: LoraModule}``.
    """
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and adapter_name in mod.lora_A:
            path = file_path(model, component, name.removeprefix("base_model.model."))
            out[f"{component}.{path}"] = LoraModule(
                down=mod.lora_A[adapter_name].weight.detach().clone(),
                up=mod.lora_B[adapter_name].weight.detach().clone(),
                alpha=float(mod.lora_alpha[adapter_name]),
            )
    return out


def to_peft_state_dict(modules: dict[str, LoraModule]) -> dict[str, torch.Tensor]:
    """``{path: LoraModule}`` -> peft state dict ``{path.lora_A.weight, path.lora_B.weight}``."""
    sd = {}
    for path, mod in modules.items():
        sd[f"{path}.lora_A.weight"] = mod.down
        sd[f"{path}.lora_B.weight"] = mod.up
    return sd


def apply_adapter(pipe, adapter: Adapter, adapter_name: str = "default") -> list[str]:
    """Inject an adapter into a pipeline's UNet / text encoders with peft and load its weights exactly.

    The adapter is validated against the pipeline first. Returns the components that received weights.
    Use ``pipe.set_adapters`` (diffusers) to change scales or combine several adapters.
    """
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    from lorakit.blocks import lora_config

    validate_adapter(adapter, pipe)
    touched = []
    for comp in COMPONENTS:
        mods = adapter.component(comp)
        model = getattr(pipe, comp, None)
        if not mods or model is None:
            continue
        mods = {live_path(model, p): m for p, m in mods.items()}
        ranks = {p: (m.rank, m.alpha) for p, m in mods.items()}
        cfg = lora_config(ranks)
        inject_adapter_in_model(cfg, model, adapter_name=adapter_name)
        ref = {p: LoraModule(m.down, m.up, m.alpha) for p, m in mods.items()}
        result = set_peft_model_state_dict(model, to_peft_state_dict(ref), adapter_name=adapter_name)
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if missing:
            raise AdapterError(f"peft did not take keys for {comp}: {missing[:5]}")
        touched.append(comp)
    return touched


def validate_adapter(adapter: Adapter, pipe, source: str | os.PathLike | None = None) -> None:
    """Check that an adapter fits a base pipeline: same architecture, every module exists, every shape fits.

    Raises:
        AdapterError listing the first offenders (at most 5) and how many there are.
    """
    from lorakit.models import pipeline_arch

    where = f"{source}: " if source else ""
    base_arch = pipeline_arch(pipe)
    arch = adapter.metadata.get("lorakit.base_arch") or guess_arch(adapter)
    if arch and {arch, base_arch} != {"sd1"} and arch != base_arch and {arch, base_arch} != {"sd1", "sd2"}:
        raise AdapterError(f"{where}adapter is for {arch} but the base model is {base_arch}")
    problems = []
    for key, mod in adapter.modules.items():
        comp, path = key.split(".", 1)
        model = getattr(pipe, comp, None)
        if model is None:
            problems.append(f"{key}: the base has no {comp}")
            continue
        try:
            layer = model.get_submodule(live_path(model, path))
        except AttributeError:
            problems.append(f"{key}: no such module in the base {comp}")
            continue
        layer = getattr(layer, "base_layer", layer)
        if isinstance(layer, torch.nn.Linear):
            want_down, want_up = (mod.rank, layer.in_features), (layer.out_features, mod.rank)
        elif isinstance(layer, torch.nn.Conv2d):
            want_down = (mod.rank, layer.in_channels, *layer.kernel_size)
            want_up = (layer.out_channels, mod.rank, 1, 1)
            if mod.down.dim() == 2 and tuple(layer.kernel_size) == (1, 1):
                want_down, want_up = (mod.rank, layer.in_channels), (layer.out_channels, mod.rank)
        else:
            problems.append(f"{key}: base module is {type(layer).__name__}, not Linear/Conv2d")
            continue
        if tuple(mod.down.shape) != want_down or tuple(mod.up.shape) != want_up:
            problems.append(
                f"{key}: down {tuple(mod.down.shape)} / up {tuple(mod.up.shape)}, base needs {want_down} / {want_up}"
            )
    if problems:
        raise AdapterError(
            f"{where}adapter does not fit the base ({base_arch}): {len(problems)} problem(s); first: "
            + "; ".join(problems[:5])
        )
