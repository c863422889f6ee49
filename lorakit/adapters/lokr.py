"""LoKr (LyCORIS): ``delta = scale * kron(w1, w2)`` with each factor stored whole or as a low-rank product.

File keys per layer: ``lokr_w1 [a, b]`` or ``lokr_w1_a [a, r] @ lokr_w1_b [r, b]``; ``lokr_w2 [c, d(, kh, kw)]``
or ``lokr_w2_a [c, r] @ lokr_w2_b [r, d*kh*kw]`` (Tucker conv: ``lokr_t2 [r, r, kh, kw]`` with
``lokr_w2_a [r, c]``, ``lokr_w2_b [r, d]``); ``alpha``. The delta is ``[a*c, b*d(, kh, kw)]``.
``scale = alpha / r`` where ``r`` is the inner dimension of ``w2_b`` (else of ``w1_b``); when both factors are
whole, LyCORIS applies no scale (alpha is ignored), and neither does lorakit.
The Kronecker product of ``w1`` with the flattened ``w2 [c, d*kh*kw]`` equals the flattened 4-D product, so
everything is computed flat and reshaped at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lorakit.adapters.base import conv_shape, factored_lora


def _split(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [m, n] = U @ V`` exactly (float64 SVD, rank min(m, n))."""
    U, S, Vh = torch.linalg.svd(w.contiguous(), full_matrices=False)
    return (U * S).contiguous(), Vh.contiguous()


@dataclass
class LokrModule:
    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    kernel: tuple[int, int] | None = None  # of a conv whose w2 is stored flat

    kind: ClassVar[str] = "lokr"
    suffixes: ClassVar[tuple[str, ...]] = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                           "lokr_t2", "alpha")

    @property
    def rank(self) -> int:
        if self.w2_b is not None:
            return self.w2_b.shape[0]
        return self.w1_b.shape[0] if self.w1_b is not None else 0

    @property
    def scale(self) -> float:
        return 1.0 if self.rank == 0 or self.alpha is None else self.alpha / self.rank

    def _w1(self) -> torch.Tensor:
        return self.w1.double() if self.w1 is not None else self.w1_a.double() @ self.w1_b.double()

    def _w2(self) -> torch.Tensor:
        if self.w2 is not None:
            return self.w2.double()
        if self.t2 is not None:
            return torch.einsum("ijkl,jr,ip->prkl", self.t2.double(), self.w2_b.double(), self.w2_a.double())
        return self.w2_a.double() @ self.w2_b.double()

    def _kernel(self) -> tuple[int, int] | None:
        w2 = self.w2 if self.w2 is not None else self.t2
        return tuple(w2.shape[-2:]) if w2 is not None and w2.dim() == 4 else self.kernel

    @property
    def is_conv(self) -> bool:
        k = self._kernel()
        return k is not None and tuple(k) != (1, 1)

    def delta(self) -> torch.Tensor:
        w1, w2 = self._w1(), self._w2()
        flat = torch.kron(w1.contiguous(), w2.reshape(w2.shape[0], -1).contiguous()) * self.scale
        k = self._kernel()
        if w2.dim() == 4 and tuple(k) == (1, 1):
            return flat.float()
        return conv_shape(flat, k).float()

    def num_parameters(self) -> int:
        parts = (self.w1, self.w1_a, self.w1_b, self.w2, self.w2_a, self.w2_b, self.t2)
        return sum(t.numel() for t in parts if t is not None)

    def to_lora(self):
        """Exact LoRA: with ``w1 = U1 V1`` and ``w2 = U2 V2``, ``kron(w1, w2) = kron(U1, U2) kron(V1, V2)``.
        Stored low-rank factors are used as they are; whole factors (small) are split by their own SVD."""
        u1, v1 = (self.w1_a.double(), self.w1_b.double()) if self.w1 is None else _split(self.w1.double())
        if self.w2_a is not None and self.t2 is None:
            u2, v2 = self.w2_a.double(), self.w2_b.double().reshape(self.w2_b.shape[0], -1)
        else:
            w2 = self._w2()
            u2, v2 = _split(w2.reshape(w2.shape[0], -1))
        up = torch.kron(u1.contiguous(), u2.contiguous())
        down = torch.kron(v1.contiguous(), v2.contiguous())
        return factored_lora(up, down, self.scale, self.delta().shape)

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        out = {f"{name}.{s}": getattr(self, s.removeprefix("lokr_")) for s in self.suffixes[:-1]
               if getattr(self, s.removeprefix("lokr_")) is not None}
        if self.alpha is not None:
            out[f"{name}.alpha"] = torch.tensor(float(self.alpha))
        return out

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], kernel=None) -> "LokrModule":
        if "lokr_w1" not in parts and not {"lokr_w1_a", "lokr_w1_b"} <= parts.keys():
            raise KeyError("LoKr layer lacks lokr_w1 (or lokr_w1_a + lokr_w1_b)")
        if "lokr_w2" not in parts and not {"lokr_w2_a", "lokr_w2_b"} <= parts.keys():
            raise KeyError("LoKr layer lacks lokr_w2 (or lokr_w2_a + lokr_w2_b)")
        kw = {s.removeprefix("lokr_"): parts.get(s) for s in cls.suffixes[:-1]}
        alpha = float(parts["alpha"]) if "alpha" in parts else None
        return cls(**kw, alpha=alpha, kernel=kernel)
