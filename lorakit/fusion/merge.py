"""Data-free weight merges of LoRA adapters: weighted, cat, svd, ties, dare.

All work per adapted layer on the adapters' deltas ``dW_i = (alpha_i / r_i) up_i down_i`` with per-adapter
weights ``w_i`` (``--weights``, default 1). A layer missing from an adapter counts as ``dW_i = 0``.

| method   | delta written                                                      | rank of the output            |
|----------|--------------------------------------------------------------------|-------------------------------|
| weighted | ``(1/N) sum_i w_i dW_i`` (average; ``combine="sum"``: no ``1/N``)  | exact: sum of ranks           |
| cat      | ``sum_i w_i dW_i`` exactly (factors stacked, peft's ``cat``)        | exact: sum of ranks           |
| svd      | ``sum_i w_i dW_i`` (or the average), truncated SVD                  | ``rank`` (default: max input) |
| ties     | peft ``merge_utils.ties``: keep top-``density`` magnitudes of each ``dW_i``, elect the sign per entry, mean of the weighted agreeing entries | SVD to ``rank`` |
| dare     | peft ``merge_utils.dare_linear``: random keep ``density``, rescale by 1/density, weighted sum (``dare_ties``: then TIES sign election + disjoint mean) | SVD to ``rank`` |

``weighted`` with ``combine="average"`` is Mix-of-Show's "weight fusion" baseline ``W0 + sum_i (w_i / N) dW_i``.
Exact outputs can also be truncated (``rank``). Every output is a :class:`~lorakit.adapters.io.LoraModule` per
layer with ``alpha = rank`` (scale 1), so ``up @ down`` is the merged delta.
"""

from __future__ import annotations

import torch

from lorakit.adapters.io import Adapter, LoraModule, live_path
from lorakit.fusion import FuseResult

COMBINE = ("average", "sum")


def _weights(adapters: list[Adapter], weights: list[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise ValueError(f"--weights has {len(weights)} values for {len(adapters)} adapters; give one per adapter")
    return [float(w) for w in weights]


def _module_shape(mods: list[LoraModule]) -> tuple[int, ...]:
    """The delta shape of a layer across adapters: ``(out, in)`` or ``(out, in, kh, kw)`` (4-D wins)."""
    shapes = {(m.up.shape[0], *m.down.shape[1:]) for m in mods}
    four = [s for s in shapes if len(s) == 4]
    if four:
        if len(set(four)) > 1 or any(len(s) == 2 and s != four[0][:2] for s in shapes):
            raise ValueError(f"adapters disagree on this layer's shape: {sorted(shapes)}")
        return four[0]
    if len(shapes) > 1:
        raise ValueError(f"adapters disagree on this layer's shape: {sorted(shapes)}")
    return next(iter(shapes))


def _layers(adapters: list[Adapter]) -> dict[str, dict[int, LoraModule]]:
    """``{key: {adapter index: LoraModule}}`` over the union of adapted layers, in first-seen order (LoHa / LoKr
    layers in their exact LoRA form)."""
    out: dict[str, dict[int, LoraModule]] = {}
    for i, ad in enumerate(adapters):
        for key, mod in ad.modules.items():
            out.setdefault(key, {})[i] = mod.to_lora()
    return out


def _factored(up: torch.Tensor, down: torch.Tensor, shape: tuple) -> LoraModule:
    """A scale-1 LoRA module from ``up [out, R]`` and ``down [R, in_flat]`` for a layer of delta ``shape``."""
    R = up.shape[1]
    if len(shape) == 4:
        up, down = up.reshape(shape[0], R, 1, 1), down.reshape(R, *shape[1:])
    return LoraModule(down=down.float().contiguous(), up=up.float().contiguous(), alpha=float(R))


def full_delta(mod: LoraModule, shape: tuple) -> torch.Tensor:
    """A module's delta as ``[out, in_flat]`` float64."""
    return (mod.scale * (mod.up.reshape(mod.up.shape[0], -1).double() @ mod.down.reshape(mod.rank, -1).double()))


def truncate(delta: torch.Tensor, shape: tuple, rank: int) -> LoraModule:
    """Best rank-``rank`` approximation (truncated SVD, float64) of ``delta [out, in_flat]`` as a LoRA module.

    The singular values are split evenly between up and down (``up = U sqrt(S)``, ``down = sqrt(S) V^T``).
    """
    if rank < 1:
        raise ValueError(f"--rank must be >= 1, got {rank}")
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    return _factored(U[:, :r] * root, root[:, None] * Vh[:r], shape)


def stacked(adapters: list[Adapter], coeffs: list[float]) -> dict[str, LoraModule]:
    """Exact ``sum_i c_i dW_i`` per layer by stacking factors: ``up = [c_i s_i up_i]``, ``down = [down_i]``."""
    out = {}
    for key, mods in _layers(adapters).items():
        shape = _module_shape(list(mods.values()))
        ups = [coeffs[i] * m.scale * m.up.reshape(m.up.shape[0], -1).double() for i, m in mods.items()]
        downs = [m.down.reshape(m.rank, -1).double() for m in mods.values()]
        out[key] = _factored(torch.cat(ups, 1), torch.cat(downs, 0), shape)
    return out


def _maybe_truncate(modules: dict[str, LoraModule], rank: int | None) -> dict[str, LoraModule]:
    if rank is None:
        return modules
    out = {}
    for key, mod in modules.items():
        shape = (mod.up.shape[0], *mod.down.shape[1:])
        out[key] = mod if mod.rank <= rank else truncate(full_delta(mod, shape), shape, rank)
    return out


def weighted(adapters, weights=None, combine: str = "average", rank: int | None = None, **_) -> dict[str, LoraModule]:
    """``(1/N) sum_i w_i dW_i`` (``combine="average"``) or ``sum_i w_i dW_i`` (``"sum"``); exact unless ``rank``."""
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
    w = _weights(adapters, weights)
    n = len(adapters) if combine == "average" else 1
    return _maybe_truncate(stacked(adapters, [x / n for x in w]), rank)


def cat(adapters, weights=None, rank: int | None = None, **_) -> dict[str, LoraModule]:
    """``sum_i w_i dW_i`` exactly, rank = sum of ranks (peft's ``cat`` combination); SVD-truncated if ``rank``."""
    return _maybe_truncate(stacked(adapters, _weights(adapters, weights)), rank)


def _per_layer(adapters, weights, rank, merge) -> dict[str, LoraModule]:
    """Apply ``merge(deltas [N, out, in_flat], weights [N]) -> [out, in_flat]`` per layer, then SVD to a rank."""
    w = torch.tensor(_weights(adapters, weights), dtype=torch.float64)
    out = {}
    for key, mods in _layers(adapters).items():
        shape = _module_shape(list(mods.values()))
        flat = (shape[0], int(torch.Size(shape[1:]).numel()))
        deltas = [full_delta(mods[i], shape) if i in mods else torch.zeros(flat, dtype=torch.float64)
                  for i in range(len(adapters))]
        merged = merge(deltas, w)
        r = rank if rank is not None else max(m.rank for m in mods.values())
        out[key] = truncate(merged, shape, r)
    return out


def svd(adapters, weights=None, rank: int | None = None, combine: str = "sum", **_) -> dict[str, LoraModule]:
    """``sum_i w_i dW_i`` (or the average) truncated to ``rank`` by SVD (default: the layer's largest input rank)."""
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
    n = len(adapters) if combine == "average" else 1
    return _per_layer(adapters, weights, rank, lambda d, w: sum(x * c for x, c in zip(d, w)) / n)


def ties(adapters, weights=None, rank: int | None = None, density: float = 0.5, majority_sign: str = "total",
         **_) -> dict[str, LoraModule]:
    """TIES-merging with peft's ``merge_utils.ties`` on each layer's full deltas, then SVD to ``rank``."""
    from peft.utils.merge_utils import ties as peft_ties

    _check_density(density)
    return _per_layer(adapters, weights, rank, lambda d, w: peft_ties(d, w, density, majority_sign))


def dare(adapters, weights=None, rank: int | None = None, density: float = 0.5, variant: str = "linear",
         majority_sign: str = "total", seed: int = 0, **_) -> dict[str, LoraModule]:
    """DARE with peft's ``dare_linear`` (or ``dare_ties``) on each layer's full deltas, then SVD to ``rank``.

    The random drop masks come from ``torch.manual_seed(seed)`` (layers in adapter order), so runs repeat.
    """
    from peft.utils.merge_utils import dare_linear, dare_ties

    _check_density(density)
    if variant not in ("linear", "ties"):
        raise ValueError(f"dare variant must be 'linear' or 'ties', got {variant!r}")
    torch.manual_seed(seed)
    if variant == "linear":
        return _per_layer(adapters, weights, rank, lambda d, w: dare_linear(d, w, density))
    return _per_layer(adapters, weights, rank, lambda d, w: dare_ties(d, w, density, majority_sign))


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"--density must be in (0, 1], got {density}")


def missing_layers(pipe, keys) -> list[str]:
    """The adapter module keys (``unet.down_blocks...``) that name no layer of ``pipe``."""
    out = []
    for key in keys:
        comp, path = key.split(".", 1)
        model = getattr(pipe, comp, None)
        try:
            if model is None:
                raise AttributeError(comp)
            model.get_submodule(live_path(model, path))
        except AttributeError:
            out.append(key)
    return out


def apply_deltas(pipe, modules: dict[str, LoraModule]) -> None:
    """Add each module's delta to the pipeline's base weights in place (float64 sum, cast back)."""
    with torch.no_grad():
        for key, mod in modules.items():
            comp, path = key.split(".", 1)
            model = getattr(pipe, comp, None)
            if model is None:
                raise ValueError(f"the base pipeline has no {comp} (needed by {key})")
            try:
                w = model.get_submodule(live_path(model, path)).weight
            except AttributeError:
                raise ValueError(f"the base model has no layer {key} (an adapter for another architecture or "
                                 "base?); fuse adapters made for this base") from None
            delta = full_delta(mod, tuple(w.shape)).reshape(w.shape).to(w.device)
            w.copy_((w.double() + delta).to(w.dtype))


def run(inputs):
    """``lorakit fuse --method weighted|cat|svd|ties|dare`` on the loaded adapters."""
    opts = inputs.settings
    common = dict(weights=inputs.weights, rank=inputs.rank)
    if inputs.method == "weighted":
        modules = weighted(inputs.adapters, combine=opts.combine or "average", **common)
    elif inputs.method == "cat":
        modules = cat(inputs.adapters, **common)
    elif inputs.method == "svd":
        modules = svd(inputs.adapters, combine=opts.combine or "sum", **common)
    elif inputs.method == "ties":
        modules = ties(inputs.adapters, density=opts.density, majority_sign=opts.majority_sign, **common)
    elif inputs.method == "dare":
        modules = dare(inputs.adapters, density=opts.density, variant=opts.dare_variant,
                       majority_sign=opts.majority_sign, seed=inputs.seed, **common)
    else:
        raise ValueError(f"lorakit.fusion.merge has no method {inputs.method!r}")
    settings = {"combine": opts.combine, "density": opts.density, "majority_sign": opts.majority_sign,
                "dare_variant": opts.dare_variant}
    return FuseResult(modules=modules, report={"settings": settings,
                                               "ranks": {k: m.rank for k, m in modules.items()}})
