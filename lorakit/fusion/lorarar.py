"""LoRA.rar: a small hypernetwork that merges a content and a style LoRA in one forward pass.

One network, shared by all merged layers, maps each column pair ``[dW_c[:, j], dW_s[:, j]]`` (length ``2 * out``)
to that column's coefficients ``(m_c, m_s)``: an input ``Linear(2 * out, hidden)`` per column width (widths
differ between layers), ReLU, and a shared ``Linear(hidden, 2)`` (hidden 128 in the paper). It is trained once
over many content/style pairs with the ZipLoRA loss (:mod:`lorakit.training.lorarar`) and then merges an unseen
pair without any optimisation (:func:`merge_pair`). The result is exported exactly as a rank ``r_c + r_s`` LoRA
(:func:`lorakit.fusion.ziplora.export_merged`).

``column_norm``: ``layer_rms`` (default) divides both columns of a layer by the RMS of ``[dW_c, dW_s]`` of that
layer before the network sees them, so one network serves layers and LoRAs of any magnitude; ``none`` feeds the
raw columns as in the paper.

File format: a ``.safetensors`` with the network's weights and header metadata ``lorakit.kind =
lorarar-hypernet`` and ``lorakit.hypernet`` (JSON: widths, hidden, column_norm, merge_layers, base_arch, ...).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from lorakit.adapters.io import Adapter, AdapterError
from lorakit.fileio import load_safetensors, save_safetensors
from lorakit.fusion import FuseResult
from lorakit.fusion.ziplora import (
    LORARAR_LAYERS,
    MergePlan,
    check_pair,
    columns,
    export_merged,
    merge_metadata,
    plan_merge,
)

HYPERNET_KIND = "lorarar-hypernet"
COLUMN_NORMS = ("layer_rms", "none")


class MergerHypernet(nn.Module):
    """Per-column merge coefficients from column pairs.

    Args:
        widths: the column lengths (``out`` of ``dW [out, in]``; ``out*kh*kw`` for convs) it serves.
        hidden: hidden width (128 in the paper).
        column_norm: ``layer_rms`` or ``none`` (module docstring).
        merge_layers: the layer patterns it was trained to merge (used by :func:`merge_pair` by default).
        init_scale: scale of the output layer's initial weights; its bias starts at 1 so an untrained
            network is close to the plain sum (``init_scale = 0`` gives exactly the sum).
    """

    def __init__(
        self,
        widths,
        hidden: int = 128,
        column_norm: str = "layer_rms",
        merge_layers=LORARAR_LAYERS,
        init_scale: float = 0.1,
        **extra,
    ):
        super().__init__()
        if column_norm not in COLUMN_NORMS:
            raise ValueError(f"column_norm {column_norm!r} is not one of {COLUMN_NORMS}")
        widths = sorted({int(w) for w in widths})
        if not widths:
            raise ValueError("a hypernetwork needs at least one column width (no merged layers found?)")
        self.config = {
            "widths": widths,
            "hidden": int(hidden),
            "column_norm": column_norm,
            "merge_layers": list(merge_layers),
            "init_scale": float(init_scale),
            **extra,
        }
        self.inputs = nn.ModuleDict({str(w): nn.Linear(2 * w, hidden) for w in widths})
        self.head = nn.Linear(hidden, 2)
        with torch.no_grad():
            self.head.weight.mul_(init_scale)
            self.head.bias.fill_(1.0)

    @property
    def merge_layers(self) -> list[str]:
        return self.config["merge_layers"]

    def forward(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Column pairs of some layers -> their coefficients.

        Args:
            pairs: per layer ``(cols_c [n, w], cols_s [n, w])``, one row per column (:meth:`column_inputs`).
        Returns:
            per layer ``[n, 2]`` (m_c, m_s). Layers of one width share one batched input-layer call.
        """
        by_width: dict[int, list[int]] = {}
        for i, (cc, _) in enumerate(pairs):
            by_width.setdefault(cc.shape[-1], []).append(i)
        out: list[torch.Tensor | None] = [None] * len(pairs)
        for w, idx in by_width.items():
            if str(w) not in self.inputs:
                raise ValueError(
                    f"this hypernetwork has no input layer for columns of length {w} (it knows "
                    f"{self.config['widths']}); was it trained on the same base architecture?"
                )
            x = torch.cat([torch.cat(pairs[i], dim=-1) for i in idx])
            m = self.head(torch.relu(self.inputs[str(w)](x)))
            for i, part in zip(idx, m.split([pairs[i][0].shape[0] for i in idx])):
                out[i] = part
        return out

    def column_inputs(self, dc: torch.Tensor, ds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's network input: ``dW_c, dW_s [out, in(, kh, kw)]`` -> ``(cols_c, cols_s) [in, w]``,
        normalised per ``column_norm``, on the network's device and dtype."""
        p = self.head.weight
        cc, cs = columns(dc).to(p.device, p.dtype), columns(ds).to(p.device, p.dtype)
        if self.config["column_norm"] == "layer_rms":
            rms = ((cc.square().sum() + cs.square().sum()) / (2 * cc.numel())).sqrt().clamp_min(1e-12)
            cc, cs = cc / rms, cs / rms
        return cc, cs

    def coefficients(self, plans, deltas=None, net=None):
        """``{layer key: (m_c [in], m_s [in])}`` for every merged layer of one plan (or a list for a list of
        plans), from a single network call; differentiable in the network's weights.

        Args:
            deltas: per plan ``{key: (dW_c, dW_s)}`` already computed (e.g. on the device); default from the plan.
            net: the callable to run (a DDP-wrapped copy of this module while training); default ``self``.
        """
        single = isinstance(plans, MergePlan)
        plans = [plans] if single else list(plans)
        deltas = [deltas] if single else (deltas or [None] * len(plans))
        inputs, keys = [], []
        for k, (plan, dl) in enumerate(zip(plans, deltas)):
            for layer in plan.merged:
                dc, ds = dl[layer.key] if dl is not None else layer.deltas()
                inputs.append(self.column_inputs(dc, ds))
                keys.append((k, layer.key))
        outs = (net or self)(inputs) if inputs else []
        result: list[dict] = [{} for _ in plans]
        for (k, key), m in zip(keys, outs):
            m = m.float()
            result[k][key] = (m[:, 0], m[:, 1])
        return result[0] if single else result


def hypernet_widths(plans) -> list[int]:
    """Every column length among the merged layers of some plans."""
    widths = set()
    for plan in plans:
        for layer in plan.merged:
            widths.add(layer.content.up.shape[0] * math.prod(layer.content.down.shape[2:]))
    return sorted(widths)


def merge_pair(
    hypernet: MergerHypernet,
    content: Adapter,
    style: Adapter,
    layers=None,
    sources: tuple[str | None, str | None] = (None, None),
) -> Adapter:
    """Merge two LoRAs with a trained hypernetwork in one forward pass; an exact rank ``r_c + r_s`` LoRA.

    Args:
        layers: layer patterns to merge (default: the ones the hypernetwork was trained on); other layers
            both adapters touch are summed.
        sources: the adapters' file paths (written into the metadata).
    Raises:
        AdapterError if no layer both adapters touch matches ``layers``.
    """
    layers = list(layers or hypernet.merge_layers)
    plan = plan_merge(content, style, layers)
    if not plan.merged:
        raise AdapterError(f"no layer both adapters touch matches the merge layers {layers}")
    with torch.no_grad():
        coeffs = hypernet.coefficients(plan)
    meta = merge_metadata("lorarar", content, style, sources, layers=layers)
    return export_merged(plan, coeffs, meta)


def save_hypernet(hypernet: MergerHypernet, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write a hypernetwork as safetensors with its config in the header (atomic)."""
    meta = {"lorakit.kind": HYPERNET_KIND, "lorakit.hypernet": json.dumps(hypernet.config), **(metadata or {})}
    return save_safetensors(hypernet.state_dict(), path, meta)


def load_hypernet(path: str | os.PathLike, device=None) -> MergerHypernet:
    """Read a hypernetwork written by :func:`save_hypernet`.

    Raises:
        FileNotFoundError; ValueError naming the file when it is not a LoRA.rar hypernetwork or its weights do
        not fit its config.
    """
    tensors, meta = load_safetensors(path)
    if meta.get("lorakit.kind") != HYPERNET_KIND or "lorakit.hypernet" not in meta:
        raise ValueError(
            f"{path}: not a LoRA.rar hypernetwork (metadata lorakit.kind is {meta.get('lorakit.kind')!r}, expected "
            f"{HYPERNET_KIND!r}); train one with `accelerate launch train_lorarar.py`"
        )
    net = MergerHypernet(**json.loads(meta["lorakit.hypernet"]))
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit the hypernetwork config: {err}") from err
    return net.to(device) if device is not None else net


__all__ = ["MergerHypernet", "merge_pair", "save_hypernet", "load_hypernet", "hypernet_widths", "HYPERNET_KIND"]


def run_fuse(inputs):
    """``lorakit fuse --method lorarar --hypernet H.safetensors --adapters CONTENT STYLE --out merged.safetensors``."""
    import time

    opts = inputs.settings
    if not getattr(opts, "hypernet", None):
        raise ValueError("--method lorarar needs --hypernet FILE (train one with `accelerate launch train_lorarar.py`)")
    content, style = check_pair(inputs)
    net = load_hypernet(opts.hypernet)
    t0 = time.perf_counter()
    merged = merge_pair(net, content, style, layers=opts.layers, sources=tuple(inputs.paths))
    seconds = time.perf_counter() - t0
    layers = list(opts.layers or net.merge_layers)
    report = {"settings": {"hypernet": str(opts.hypernet), "layers": layers}, "merge_seconds": seconds}
    return FuseResult(modules=merged.modules, report=report, metadata={"lorakit.merge": merged.metadata["lorakit.merge"]})
