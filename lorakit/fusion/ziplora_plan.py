"""ZipLoRA / LoRA.rar merge plans: which layers of a (content, style) pair are merged per column, and the
merged pair written back as one LoRA of rank ``r_c + r_s`` (:func:`export_merged`)."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field

import torch

from lorakit.adapters.io import Adapter, AdapterError, LoraModule, adapter_metadata

ALL_LAYERS = ("*",)
LORARAR_LAYERS = ("to_q", "to_out.0")  # the paper's merged layers; to_k / to_v are summed


# --------------------------------------------------------------------------------------------- merge plan


@dataclass
class MergeLayer:
    """One layer both adapters touch."""

    key: str  # adapter module key, ``unet.<path>``
    content: LoraModule
    style: LoraModule

    @property
    def path(self) -> str:
        return self.key.split(".", 1)[1]

    def deltas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dW_c, dW_s)``, float32, ``[out, in]`` or ``[out, in, kh, kw]``."""
        dc, ds = self.content.delta(), self.style.delta()
        if dc.dim() != ds.dim():  # a 1x1 conv stored 2-D in one file and 4-D in the other
            dc, ds = dc.reshape(dc.shape[0], dc.shape[1], -1).squeeze(-1), ds.reshape(ds.shape[0], ds.shape[1], -1).squeeze(-1)
        return dc, ds


@dataclass
class MergePlan:
    """How two adapters combine: ``merged`` layers get per-column coefficients; ``summed`` layers add both
    deltas (coefficients fixed at 1); layers only one adapter has are kept as they are."""

    merged: list[MergeLayer] = field(default_factory=list)
    summed: list[MergeLayer] = field(default_factory=list)
    content_only: dict[str, LoraModule] = field(default_factory=dict)
    style_only: dict[str, LoraModule] = field(default_factory=dict)


def layer_matches(key: str, patterns) -> bool:
    """Whether a module key is selected by layer patterns.

    A pattern matches a key that ends with ``.pattern`` (``to_q``, ``to_out.0``, ``attn2.to_v``) or, when it
    holds ``*``/``?``, the whole key as a glob (``*`` alone = every layer).
    """
    for p in patterns:
        if any(c in p for c in "*?["):
            if fnmatch.fnmatchcase(key, p) or fnmatch.fnmatchcase(key, "unet." + p):
                return True
        elif key.endswith("." + p):
            return True
    return False


def plan_merge(content: Adapter, style: Adapter, merge_layers=LORARAR_LAYERS) -> MergePlan:
    """Pair the layers of a content and a style adapter.

    Args:
        merge_layers: patterns (:func:`layer_matches`) of the UNet layers that get coefficients.
    Raises:
        AdapterError when a layer both adapters touch has different shapes in the two files.
    """
    plan = MergePlan()
    for key, c in content.modules.items():
        s = style.modules.get(key)
        if s is None:
            plan.content_only[key] = c
            continue
        if c.down.shape[1:] != s.down.shape[1:] and c.down.reshape(c.rank, -1).shape != s.down.reshape(s.rank, -1).shape:
            raise AdapterError(
                f"layer {key}: content down {tuple(c.down.shape)} and style down {tuple(s.down.shape)} do not fit the "
                "same base layer (are both adapters for the same base model?)"
            )
        if c.up.shape[0] != s.up.shape[0]:
            raise AdapterError(f"layer {key}: content up {tuple(c.up.shape)} vs style up {tuple(s.up.shape)}")
        layer = MergeLayer(key, c, s)
        if key.startswith("unet.") and layer_matches(key, merge_layers):
            plan.merged.append(layer)
        else:
            plan.summed.append(layer)
    plan.style_only = {k: s for k, s in style.modules.items() if k not in content.modules}
    return plan


def columns(delta: torch.Tensor) -> torch.Tensor:
    """The columns of a delta as rows: ``[out, in]`` -> ``[in, out]``; ``[out, in, kh, kw]`` -> ``[in, out*kh*kw]``."""
    return delta.transpose(0, 1).reshape(delta.shape[1], -1)


def _per_column(m: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return m.reshape(1, -1, *([1] * (delta.dim() - 2)))


def merged_delta(dc: torch.Tensor, ds: torch.Tensor, m_c: torch.Tensor, m_s: torch.Tensor) -> torch.Tensor:
    """``m_c * dW_c + m_s * dW_s`` with ``m [in]`` scaling the columns of ``dW [out, in(, kh, kw)]``."""
    return _per_column(m_c, dc) * dc + _per_column(m_s, ds) * ds


def _scaled_down(mod: LoraModule, m: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    down = mod.down.float().reshape(mod.rank, *like.shape[1:]) if mod.down.dim() != like.dim() else mod.down.float()
    if m is None:
        return down * mod.scale
    return down * _per_column(mod.scale * m.detach().float().to(down.device), down)


def _stack(c: LoraModule, s: LoraModule, m_c=None, m_s=None) -> LoraModule:
    """The exact rank ``r_c + r_s`` LoRA of ``m_c * dW_c + m_s * dW_s`` (alpha = rank, so scale 1)."""
    like = c.down if c.down.dim() >= s.down.dim() else s.down
    down = torch.cat([_scaled_down(c, m_c, like), _scaled_down(s, m_s, like)], dim=0)
    up_c, up_s = c.up.float(), s.up.float()
    if up_c.dim() != up_s.dim():
        up_c, up_s = up_c.reshape(up_c.shape[0], -1, *([1] * (like.dim() - 2))), up_s.reshape(up_s.shape[0], -1, *([1] * (like.dim() - 2)))
    up = torch.cat([up_c, up_s], dim=1)
    return LoraModule(down=down, up=up, alpha=float(down.shape[0]))


def export_merged(plan: MergePlan, coeffs: dict[str, tuple[torch.Tensor, torch.Tensor]], metadata: dict | None = None) -> Adapter:
    """Write a merge as a plain LoRA, exactly.

    Merged layers become rank ``r_c + r_s`` modules with ``down = [scale_c * m_c * A_c ; scale_s * m_s * A_s]``
    (columns scaled), ``up = [B_c, B_s]``, ``alpha = r_c + r_s``; summed layers the same with coefficients 1;
    layers only one adapter has are copied.

    Args:
        coeffs: ``{layer key: (m_c [in], m_s [in])}`` for every layer in ``plan.merged``.
    """
    missing = [layer.key for layer in plan.merged if layer.key not in coeffs]
    if missing:
        raise ValueError(f"no coefficients for merged layer(s) {missing[:3]} ({len(missing)} in all)")
    out = Adapter(metadata=dict(metadata or {}))
    for layer in plan.merged:
        m_c, m_s = coeffs[layer.key]
        out.modules[layer.key] = _stack(layer.content, layer.style, m_c, m_s)
    for layer in plan.summed:
        out.modules[layer.key] = _stack(layer.content, layer.style)
    for key, mod in {**plan.content_only, **plan.style_only}.items():
        out.modules[key] = LoraModule(mod.down, mod.up, mod.alpha)  # shared tensors: nothing writes to them
    return out


def merge_metadata(method: str, content: Adapter, style: Adapter, sources=(None, None), **extra) -> dict[str, str]:
    """Header metadata of a merged adapter (:func:`lorakit.adapters.io.adapter_metadata`, both triggers joined)
    plus ``lorakit.merge``: JSON of the method, the content and style files and ``extra``."""
    arch = content.arch or style.arch or "sd1"
    triggers = [t for t in (content.metadata.get("lorakit.trigger"), style.metadata.get("lorakit.trigger")) if t]
    merge = {"method": method, "content": str(sources[0] or ""), "style": str(sources[1] or ""), **extra}
    return adapter_metadata(arch, "lora", trigger=", ".join(triggers) or None, **{"lorakit.merge": json.dumps(merge, default=str)})
