"""LoHa (LyCORIS): ``delta = (alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b)`` (Hadamard product of two LoRAs).

File keys per layer: ``hada_w1_a [out, r]``, ``hada_w1_b [r, in*kh*kw]``, ``hada_w2_a``, ``hada_w2_b``,
``alpha``; a Tucker-decomposed conv adds ``hada_t1`` / ``hada_t2 [r, r, kh, kw]`` and stores
``hada_w*_a [r, out]``, ``hada_w*_b [r, in]``. A missing alpha means scale 1 (alpha = r), as LyCORIS.
peft's ``LoHaConfig`` layers use the same factor shapes (non-Tucker).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lorakit.adapters.base import conv_shape, exact_lora, factored_lora


def _tucker(t: torch.Tensor, w_b: torch.Tensor, w_a: torch.Tensor) -> torch.Tensor:
    """Rebuild ``[out, in, kh, kw]`` from a Tucker core ``t [r, r, kh, kw]``, ``w_b [r, in]``, ``w_a [r, out]``."""
    return torch.einsum("ijkl,jr,ip->prkl", t.double(), w_b.double(), w_a.double())


@dataclass
class LohaModule:
    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    alpha: float
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    kernel: tuple[int, int] | None = None  # (kh, kw) of a conv stored flat; None for Linear / 1x1

    kind: ClassVar[str] = "loha"
    suffixes: ClassVar[tuple[str, ...]] = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                                           "alpha")

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.t1 is not None or (self.kernel is not None and tuple(self.kernel) != (1, 1))

    def delta(self) -> torch.Tensor:
        if self.t1 is not None:
            d = _tucker(self.t1, self.w1_b, self.w1_a) * _tucker(self.t2, self.w2_b, self.w2_a)
        else:
            d = (self.w1_a.double() @ self.w1_b.double()) * (self.w2_a.double() @ self.w2_b.double())
            d = conv_shape(d, self.kernel)
        return (self.scale * d).float()

    def num_parameters(self) -> int:
        return sum(t.numel() for t in (self.w1_a, self.w1_b, self.w2_a, self.w2_b, self.t1, self.t2) if t is not None)

    def to_lora(self):
        """Exact LoRA of rank ``r1 * r2``: ``(A1 B1) * (A2 B2) = sum_ij (a1_i * a2_j)(b1_i * b2_j)^T`` (column-wise
        products of the factors), no decomposition needed; Tucker layers go through an SVD."""
        if self.t1 is not None:
            return exact_lora(self.delta(), self.rank * self.w2_b.shape[0])
        out = self.w1_a.shape[0]
        up = (self.w1_a.double()[:, :, None] * self.w2_a.double()[:, None, :]).reshape(out, -1)
        down = (self.w1_b.double()[:, None, :] * self.w2_b.double()[None, :, :]).reshape(up.shape[1], -1)
        shape = conv_shape(torch.empty(out, down.shape[1], device="meta"), self.kernel).shape
        return factored_lora(up, down, self.scale, shape)

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        out = {f"{name}.hada_w1_a": self.w1_a, f"{name}.hada_w1_b": self.w1_b, f"{name}.hada_w2_a": self.w2_a,
               f"{name}.hada_w2_b": self.w2_b, f"{name}.alpha": torch.tensor(float(self.alpha))}
        if self.t1 is not None:
            out[f"{name}.hada_t1"], out[f"{name}.hada_t2"] = self.t1, self.t2
        return out

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], kernel=None) -> "LohaModule":
        missing = [s for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if s not in parts]
        if missing:
            raise KeyError(f"LoHa layer lacks {missing}")
        if ("hada_t1" in parts) != ("hada_t2" in parts):
            raise KeyError("LoHa layer has only one of hada_t1 / hada_t2")
        rank = parts["hada_w1_b"].shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        return cls(parts["hada_w1_a"], parts["hada_w1_b"], parts["hada_w2_a"], parts["hada_w2_b"], alpha,
                   parts.get("hada_t1"), parts.get("hada_t2"), None if "hada_t1" in parts else kernel)
