"""Activation statistics for least-squares fusion, gathered by forward pre-hooks (no activation is kept).

For a layer ``y = W x`` (Linear, or Conv2d seen on unfolded patches) and concepts ``i`` whose LoRA on that
layer is ``a_i dW_i = U_i D_i`` (``U_i [out, r_i]`` already scaled by ``a_i * alpha_i / r_i``, ``D_i [r_i, in]``),
the fusion objective ``sum_i ||W X_i - (W0 + U_i D_i) X_i||^2`` needs only

* ``G = sum_i X_i X_i^T``          ``[in, in]``, over every concept's tokens, and
* ``P_i = D_i X_i X_i^T``         ``[r_i, in]``, over concept ``i``'s own tokens,

because ``sum_i (W0 + U_i D_i) G_i = W0 G + sum_i U_i P_i``. A hook sees one batch of inputs ``X`` at a time and
adds ``X X^T`` to ``G`` and ``(D_c X) X^T`` to ``P_c`` of the concept ``c`` being run, in float64. Memory is
``in^2 + sum_i r_i in`` numbers per layer, whatever the number of tokens or sampling steps.

``keep_inputs=True`` also keeps the raw inputs per concept (for the LBFGS reference in tools/ and the tests
only; never in the product path).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def flat_inputs(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows a layer multiplies by its (flattened) weight.

    Args:
        module: ``nn.Linear`` or ``nn.Conv2d`` (groups 1).
        x: its input, ``[..., in]`` for Linear, ``[B, C, H, W]`` for Conv2d.
    Returns:
        ``[n, in]`` for Linear; ``[n, C*kh*kw]`` (unfolded patches, the order of ``weight.flatten(1)``) for Conv2d.
    """
    if isinstance(module, torch.nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"grouped convolutions (groups={module.groups}) are not supported by gradient fusion")
        if module.padding_mode != "zeros":
            raise ValueError(f"conv padding_mode {module.padding_mode!r} is not supported by gradient fusion")
        k, s, p, d = module.kernel_size, module.stride, module.padding, module.dilation
        if tuple(k) == (1, 1) and tuple(s) == (1, 1) and tuple(p) == (0, 0):
            return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # [B, C*kh*kw, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


@dataclass
class LayerStats:
    """Accumulated statistics of one layer (see the module docstring).

    ``G [in, in]``, ``P {concept: [r, in]}``, ``tokens`` (rows seen), all on ``device`` in float64.
    """

    G: torch.Tensor
    P: dict[int, torch.Tensor] = field(default_factory=dict)
    tokens: torch.Tensor = None  # float64 scalar tensor, so it reduces across processes with the rest
    inputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)


class GramCollector:
    """Register pre-hooks on layers of a model and accumulate :class:`LayerStats` for the current concept.

    Args:
        model: the model holding the layers (a UNet or a text encoder).
        layers: ``{name: (module path in model, {concept: D_i [r_i, in_flat]})}``; ``name`` is the caller's key.
        device: where the statistics live (the model's device).
        keep_inputs: also keep raw flattened inputs per concept (reference/test use only).

    Use ``with collector:`` around forward passes and ``collector.concept = i`` to say whose activations run.
    """

    def __init__(self, model, layers: dict, device=None, keep_inputs: bool = False):
        self.model = model
        self.layers = layers
        self.keep_inputs = keep_inputs
        self.concept: int | None = None
        self.device = device
        self.stats: dict[str, LayerStats] = {}
        self._downs: dict[str, dict[int, torch.Tensor]] = {}
        self._handles = []
        for name, (path, downs) in layers.items():
            module = model.get_submodule(path)
            dev = device or module.weight.device
            dim = module.weight[0].numel()
            self.stats[name] = LayerStats(
                G=torch.zeros(dim, dim, dtype=torch.float64, device=dev),
                P={c: torch.zeros(d.shape[0], dim, dtype=torch.float64, device=dev) for c, d in downs.items()},
                tokens=torch.zeros((), dtype=torch.float64, device=dev),
            )
            self._downs[name] = {c: d.to(device=dev, dtype=torch.float64) for c, d in downs.items()}

    def _hook(self, name: str):
        def hook(module, args):
            if self.concept is None:
                return
            x = flat_inputs(module, args[0].detach()).to(torch.float64)
            st = self.stats[name]
            st.G.addmm_(x.T, x)
            st.tokens += x.shape[0]
            down = self._downs[name].get(self.concept)
            if down is not None:
                st.P[self.concept].addmm_(down @ x.T, x)
            if self.keep_inputs:
                st.inputs.setdefault(self.concept, []).append(x.cpu())

        return hook

    def __enter__(self):
        for name, (path, _) in self.layers.items():
            module = self.model.get_submodule(path)
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.concept = None
        return False

    def reduce(self) -> None:
        """Sum the statistics over all processes (no-op in a single process), via accelerate."""
        from accelerate import PartialState
        from accelerate.utils import reduce

        if PartialState().num_processes == 1:
            return
        for st in self.stats.values():
            st.G = reduce(st.G, reduction="sum")
            st.tokens = reduce(st.tokens, reduction="sum")
            for c in sorted(st.P):
                st.P[c] = reduce(st.P[c], reduction="sum")
