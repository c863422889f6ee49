"""The adapter-type protocol: what every adapted layer (LoRA, LoCon, LoHa, LoKr) offers the rest of lorakit.

One module per adapter type lives next to this file (``lora.py``, ``locon.py``, ``loha.py``, ``lokr.py``;
ED-LoRA's embeddings and routing in ``edlora.py``); :mod:`lorakit.adapters.registry` lists them. Code outside
``lorakit.adapters`` only uses what this protocol declares, plus :meth:`AdapterModule.to_lora` where it needs
low-rank factors (weight merges, gradient fusion, peft injection): that form is exact, so every method that is
exact for LoRA stays exact for the other types.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch

from lorakit.adapters.lora import LoraModule


@runtime_checkable
class AdapterModule(Protocol):
    """One adapted layer of a base model (Linear or Conv2d).

    ``kind``: the type's name in files and reports (``lora``, ``loha``, ``lokr``).
    ``suffixes``: the tensor-name suffixes of one layer in a kohya / LyCORIS file (``lora_down.weight``, ...).
    """

    kind: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]

    @property
    def rank(self) -> int:
        """The dimension stored in the file (kohya ``network_dim``; 0 for a LoKr without low-rank factors)."""

    @property
    def is_conv(self) -> bool:
        """True when the delta has a spatial kernel (``[out, in, kh, kw]``)."""

    def delta(self) -> torch.Tensor:
        """The weight change, float32: ``[out, in]`` (Linear, 1x1 conv) or ``[out, in, kh, kw]``."""

    def num_parameters(self) -> int:
        """Stored parameters (alpha excluded)."""

    def to_lora(self) -> "LoraModule":
        """An exact LoRA of the same delta (``up @ down * alpha / rank == delta()`` to float precision)."""

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of this layer under a kohya / LyCORIS layer ``name`` (``{name}.{suffix}: tensor``)."""


def exact_lora(delta: torch.Tensor, rank_bound: int) -> "LoraModule":
    """Factor a delta ``[out, in(, kh, kw)]`` exactly as a LoRA of rank ``min(rank_bound, out, in*kh*kw)``.

    The SVD runs in float64; ``rank_bound`` is the algebraic rank bound of the type (``r1 * r2`` for a Hadamard
    product, the product of factor ranks for a Kronecker product), so nothing but float noise is dropped.
    Returns a scale-1 module (``alpha == rank``); conv deltas give ``down [R, in, kh, kw]``, ``up [out, R, 1, 1]``.
    """
    flat = delta.reshape(delta.shape[0], -1).double()
    U, S, Vh = torch.linalg.svd(flat, full_matrices=False)
    r = max(1, min(int(rank_bound), S.numel()))
    root = S[:r].sqrt()
    up, down = U[:, :r] * root, root[:, None] * Vh[:r]
    if delta.dim() == 4:
        up, down = up.reshape(delta.shape[0], r, 1, 1), down.reshape(r, *delta.shape[1:])
    return LoraModule(down=down.float().contiguous(), up=up.float().contiguous(), alpha=float(r))


def factored_lora(up: torch.Tensor, down: torch.Tensor, scale: float, shape: torch.Size) -> "LoraModule":
    """A scale-1 LoRA with ``delta = scale * up @ down`` for a layer of delta ``shape`` (``up [out, R]``,
    ``down [R, in*kh*kw]``; conv layers get ``down [R, in, kh, kw]``, ``up [out, R, 1, 1]``)."""
    R = up.shape[1]
    up = up.double() * scale
    if len(shape) == 4:
        up, down = up.reshape(shape[0], R, 1, 1), down.reshape(R, *shape[1:])
    return LoraModule(down=down.float().contiguous(), up=up.float().contiguous(), alpha=float(R))


def conv_shape(flat: torch.Tensor, kernel: tuple[int, int] | None) -> torch.Tensor:
    """``[out, in*kh*kw]`` -> ``[out, in, kh, kw]`` when ``kernel`` is known and not 1x1; else unchanged."""
    if kernel is None or tuple(kernel) == (1, 1):
        return flat
    kh, kw = kernel
    return flat.reshape(flat.shape[0], flat.shape[1] // (kh * kw), kh, kw)
