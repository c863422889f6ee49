"""Adapter files: kohya / LyCORIS-named ``.safetensors`` with lorakit metadata; conversion to and from peft.

On disk: ``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (LoHa:
``.hada_*``, LoKr: ``.lokr_*``); ``lora_te_`` (SD1/SD2 text encoder) or ``lora_te1_`` / ``lora_te2_`` (SDXL).
SDXL UNet layers are written with SAI / LDM names by default (``lora_unet_input_blocks_4_1_...``, as kohya's
``sdxl_train_network`` writes them; :mod:`lorakit.adapters.keys`). docs/formats.md says which tool reads which.

In memory an adapter is an :class:`Adapter`: ``{module key: AdapterModule}`` where a module key is the module's
path prefixed by its pipeline component (``unet.down_blocks.0.attentions.0.proj_in``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``, ``text_encoder_2....``), plus metadata and
any extra tensors (ED-LoRA embeddings). Each layer is one of the adapter types of
:mod:`lorakit.adapters.registry` (LoRA / LoCon, LoHa, LoKr).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.adapters.base import AdapterModule
from lorakit.adapters.formats import FormatError, read_layers
from lorakit.adapters.keys import (  # noqa: F401 - kohya_prefix / module_path_from_kohya re-exported for callers
    COMPONENTS,
    KEY_STYLES,
    kohya_name,
    kohya_prefix,
    module_path_from_kohya,
)
from lorakit.adapters.locon import is_locon
from lorakit.adapters.lora import LoraModule
from lorakit.blocks import lora_config
from lorakit.conditioning import pipeline_arch
from lorakit.fileio import load_safetensors, save_safetensors
from lorakit.logs import library_notices_off

FORMAT_VERSION = "1"


class AdapterError(ValueError):
    """An adapter file that cannot be read, or that does not fit a base model."""


@dataclass
class Adapter:
    """A LoRA / LoCon / LoHa / LoKr / ED-LoRA adapter in memory; ``modules`` values follow
    :class:`lorakit.adapters.base.AdapterModule`."""

    modules: dict[str, AdapterModule] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    source_format: str | None = None  # the layout it was read from (load_adapter), for reports

    @property
    def arch(self) -> str | None:
        return self.metadata.get("lorakit.base_arch") or guess_arch(self)

    @property
    def kind(self) -> str:
        if "lorakit.kind" in self.metadata:
            return self.metadata["lorakit.kind"]
        kinds = {m.kind for m in self.modules.values()}
        for kind in ("loha", "lokr"):
            if kind in kinds:
                return kind
        return "locon" if any(is_locon(m) for m in self.modules.values()) else "lora"

    def component(self, name: str) -> dict[str, AdapterModule]:
        """The modules of one pipeline component, keyed by their path inside it."""
        prefix = name + "."
        return {k[len(prefix) :]: v for k, v in self.modules.items() if k.startswith(prefix)}

    def num_parameters(self) -> int:
        return sum(m.num_parameters() for m in self.modules.values())

    def as_lora(self) -> "Adapter":
        """The same adapter with every layer in its exact LoRA form (LoRA / LoCon layers are shared, not copied)."""
        if all(isinstance(m, LoraModule) for m in self.modules.values()):
            return self
        meta = {k: v for k, v in self.metadata.items() if not (k == "lorakit.kind" and v in ("loha", "lokr"))}
        return Adapter({k: m.to_lora() for k, m in self.modules.items()}, meta, dict(self.extra))


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
    """lorakit's header metadata, every value a string: ``lorakit.format`` (format version), ``lorakit.kind``,
    ``lorakit.base_arch``; where given ``lorakit.blocks`` (JSON ``{block: rank}``), ``lorakit.trigger``,
    ``lorakit.config`` (JSON of the resolved config), kohya's ``ss_network_dim`` / ``ss_network_alpha``; then
    ``extra`` as given."""
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


def default_key_style(arch: str) -> str:
    """The UNet naming written by default: SAI for SDXL (what kohya writes, and the only SDXL naming every
    consumer places completely: A1111 moves one diffusers-named upsampler), diffusers names for SD1/SD2."""
    return "sai" if arch == "sdxl" else "diffusers"


def adapter_tensors(adapter: Adapter, arch: str, key_style: str = "auto",
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The kohya / LyCORIS-named tensors of an adapter (layers, then extra tensors)."""
    if key_style not in KEY_STYLES:
        raise ValueError(f"key style {key_style!r}; expected one of {KEY_STYLES}")
    style = default_key_style(arch) if key_style == "auto" else key_style
    if style == "sai" and arch != "sdxl":
        raise ValueError(f"--key-style sai is for SDXL adapters; this one is {arch} (kohya writes SD1/SD2 with "
                         "diffusers names)")
    tensors: dict[str, torch.Tensor] = {}
    for key, mod in adapter.modules.items():
        for name, value in mod.state_dict(kohya_name(key, arch, style)).items():
            cast = dtype is not None and value.is_floating_point() and not name.endswith(".alpha")
            tensors[name] = value.to(dtype) if cast else value
    tensors.update(adapter.extra)
    return tensors


def save_adapter(adapter: Adapter, path: str | os.PathLike, dtype: torch.dtype | None = None,
                 key_style: str = "auto") -> Path:
    """Write an adapter as a kohya / LyCORIS-named safetensors file with its metadata, atomically.

    Args:
        adapter: modules keyed by component path; ``metadata['lorakit.base_arch']`` decides te prefixes.
        dtype: store weights in this dtype (e.g. ``torch.float16``); default keeps each tensor's dtype.
        key_style: UNet layer names: ``diffusers`` (``lora_unet_down_blocks_...``), ``sai``
            (``lora_unet_input_blocks_...``, SDXL only) or ``auto`` (:func:`default_key_style`).
    """
    arch = adapter.metadata.get("lorakit.base_arch") or guess_arch(adapter) or "sd1"
    tensors = adapter_tensors(adapter, arch, key_style, dtype)
    meta = dict(adapter.metadata)
    meta.setdefault("lorakit.format", FORMAT_VERSION)
    meta.setdefault("lorakit.base_arch", arch)
    meta.setdefault("lorakit.kind", adapter.kind)
    return save_safetensors(tensors, path, meta)


def load_adapter(path: str | os.PathLike, layers_per_block: int = 2) -> Adapter:
    """Read an adapter file: lorakit / kohya / LyCORIS files (diffusers or SAI/LDM names; LoRA, LoCon, LoHa,
    LoKr) and peft / diffusers LoRA files with their alpha metadata (:mod:`lorakit.adapters.formats`).

    Args:
        layers_per_block: the base UNet's, for renumbering SAI names (2 for every SD1/SD2/SDXL model).
    Raises:
        FileNotFoundError; AdapterError naming the file for truncated files, unsupported adapter types
        (OFT, BOFT, DoRA, ...), keys that cannot be placed (with the guessed format) and files without weights.
    """
    path = Path(path)
    tensors, meta = load_safetensors(path)
    try:
        layers = read_layers(tensors, meta, path, layers_per_block)
    except FormatError as err:
        raise AdapterError(str(err)) from err
    adapter = Adapter(modules=layers.modules, metadata=meta, extra=layers.extra, source_format=layers.format)
    check_finite(adapter, path)
    return adapter


def check_finite(adapter: Adapter, path) -> None:
    """Refuse an adapter holding NaN/inf: merged, fused or sampled it would only give NaN weights or black
    images. Raises AdapterError naming the file and the first bad tensor."""
    tensors = {k: t for key, mod in adapter.modules.items() for k, t in mod.state_dict(key).items()}
    tensors.update({k: t for k, t in adapter.extra.items() if isinstance(t, torch.Tensor)})
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AdapterError(f"{path}: {key} holds NaN/inf values (a diverged training or a "
                               "damaged file); lorakit does not use it")


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
            if k.endswith("attn2.to_k") and mod.delta().shape[1] == 1024:
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

    The adapter is validated against the pipeline first; LoHa / LoKr layers are injected as their exact LoRA
    factorisation (:meth:`AdapterModule.to_lora`), so scales and ``set_adapters`` work as for LoRA.
    Returns the components that received weights.
    Use ``pipe.set_adapters`` (diffusers) to change scales or combine several adapters.
    """
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    validate_adapter(adapter, pipe)
    adapter = adapter.as_lora()  # LoHa / LoKr layers go in as their exact LoRA factors
    touched = []
    for comp in COMPONENTS:
        mods = adapter.component(comp)
        model = getattr(pipe, comp, None)
        if not mods or model is None:
            continue
        mods = {live_path(model, p): m for p, m in mods.items()}
        ranks = {p: (m.rank, m.alpha) for p, m in mods.items()}
        cfg = lora_config(ranks)
        with library_notices_off():  # peft's notice on a model's second adapter
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
        problem = _fit_problem(key, mod, layer)
        if problem:
            problems.append(problem)
    if problems:
        raise AdapterError(
            f"{where}adapter does not fit the base ({base_arch}): {len(problems)} problem(s); first: "
            + "; ".join(problems[:5])
        )


def _fit_problem(key: str, mod, layer) -> str | None:
    """Why an adapted layer does not fit a base layer, or None."""
    if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
        return f"{key}: base module is {type(layer).__name__}, not Linear/Conv2d"
    if not isinstance(mod, LoraModule):
        shape, want = tuple(mod.delta().shape), tuple(layer.weight.shape)
        flat_ok = len(shape) == 2 and shape == (want[0], int(torch.Size(want[1:]).numel()))
        if shape != want and not (flat_ok and isinstance(layer, torch.nn.Conv2d) and want[2:] == (1, 1)):
            return f"{key}: {mod.kind} delta {shape}, base weight {want}"
        return None
    if isinstance(layer, torch.nn.Linear):
        want_down, want_up = (mod.rank, layer.in_features), (layer.out_features, mod.rank)
    else:
        want_down = (mod.rank, layer.in_channels, *layer.kernel_size)
        want_up = (layer.out_channels, mod.rank, 1, 1)
        if mod.down.dim() == 2 and tuple(layer.kernel_size) == (1, 1):
            want_down, want_up = (mod.rank, layer.in_channels), (layer.out_channels, mod.rank)
    if tuple(mod.down.shape) != want_down or tuple(mod.up.shape) != want_up:
        return f"{key}: down {tuple(mod.down.shape)} / up {tuple(mod.up.shape)}, base needs {want_down} / {want_up}"
    return None
