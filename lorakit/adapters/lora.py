"""LoRA: ``delta = (alpha / rank) * up @ down`` (Hu et al.; kohya ``lora_down`` / ``lora_up`` / ``alpha``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class LoraModule:
    """One LoRA layer. Shapes: Linear ``down [r, in]``, ``up [out, r]``; Conv2d (LoCon, :mod:`locon`)
    ``down [r, in, kh, kw]``, ``up [out, r, 1, 1]``."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    kind: ClassVar[str] = "lora"
    suffixes: ClassVar[tuple[str, ...]] = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha")

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

    def num_parameters(self) -> int:
        return self.down.numel() + self.up.numel()

    def to_lora(self) -> "LoraModule":
        return self

    def state_dict(self, name: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
        return {f"{name}.lora_down.weight": cast(self.down), f"{name}.lora_up.weight": cast(self.up),
                f"{name}.alpha": torch.tensor(float(self.alpha))}

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], kernel=None) -> "LoraModule":
        """From ``{suffix: tensor}`` of one layer; a missing alpha means ``alpha = rank`` (scale 1).

        A LyCORIS Tucker LoCon (``lora_mid.weight [r, r, kh, kw]`` between a 1x1 ``lora_down [r, in, 1, 1]`` and
        ``lora_up``) is folded exactly into one down factor: ``down'[a, i, k, l] = sum_b mid[a, b, k, l] down[b, i]``.
        """
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise KeyError("LoRA layer needs both lora_down.weight and lora_up.weight")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        if "lora_mid.weight" in parts:
            mid = parts["lora_mid.weight"]
            down = torch.einsum("abkl,bi->aikl", mid.double(), down.double().flatten(1)).to(down.dtype)
        return cls(down=down, up=up, alpha=alpha)
