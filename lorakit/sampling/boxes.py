"""Boxes of regional sampling: ``[top, left, bottom, right]`` boxes read from px or fractions, and the feature-map
cells a box covers under each ``box_rounding`` rule (see :mod:`lorakit.sampling.regional`)."""

from __future__ import annotations

import math

import torch

BOX_ROUNDINGS = ("inside", "center")
UNITS = ("px", "fraction")


def read_box(box, unit: str, width: int, height: int, where: str) -> tuple[float, float, float, float]:
    """A ``[top, left, bottom, right]`` box in ``unit`` (px or fraction) -> fractions of the image, validated."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"{where}: box must be [top, left, bottom, right], got {box!r}")
    try:
        top, left, bottom, right = (float(v) for v in box)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: box values must be numbers, got {box!r}") from err
    if unit == "px":
        if not (0.0 <= top < bottom <= height and 0.0 <= left < right <= width):
            raise ValueError(f"{where}: box {list(box)} (px) must satisfy 0 <= top < bottom <= {height} and "
                             f"0 <= left < right <= {width} (image {width}x{height})")
        return (top / height, left / width, bottom / height, right / width)
    if not (0.0 <= top < bottom <= 1.0 and 0.0 <= left < right <= 1.0):
        raise ValueError(f"{where}: box {list(box)} (fraction) must satisfy 0 <= top < bottom <= 1 and 0 <= left < right <= 1")
    return (top, left, bottom, right)


def _snap(x: float) -> float:
    """``x`` moved onto the nearest integer when it is within float noise of it (box edges on cell boundaries)."""
    r = round(x)
    return float(r) if abs(x - r) < 1e-6 else x


def cell_range(start: float, end: float, n: int, rounding: str = "inside") -> tuple[int, int]:
    """Cells ``[i0, i1)`` of an ``n``-cell axis that the fractional interval ``[start, end)`` covers."""
    a, b = _snap(start * n), _snap(end * n)
    if rounding == "inside":
        i0, i1 = math.ceil(a), math.floor(b)
    elif rounding == "center":
        i0, i1 = math.ceil(_snap(a - 0.5)), math.ceil(_snap(b - 0.5))
    else:
        raise ValueError(f"box_rounding must be one of {', '.join(BOX_ROUNDINGS)}, got {rounding!r}")
    i0, i1 = max(0, i0), min(n, i1)
    return i0, max(i0, i1)


def box_mask(box: tuple[float, float, float, float], h: int, w: int, rounding: str = "inside") -> torch.Tensor:
    """``[h, w]`` float mask, 1 on the feature-map cells the fractional box covers under ``rounding``."""
    top, left, bottom, right = box
    r0, r1 = cell_range(top, bottom, h, rounding)
    c0, c1 = cell_range(left, right, w, rounding)
    mask = torch.zeros(h, w)
    mask[r0:r1, c0:c1] = 1.0
    return mask
