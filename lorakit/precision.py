"""Precision names of the recipes (``mixed_precision``, ``save_precision``) and their torch dtypes.

``no`` / ``fp32`` mean float32; YAML reads a bare ``no`` as false, which means the same.
"""

from __future__ import annotations

import torch

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_FP32_NAMES = ("no", "false", "none", "fp32", "")


def precision_name(value, key: str) -> str:
    """``value`` as accelerate's ``no`` / ``fp16`` / ``bf16``; ValueError naming ``key`` otherwise."""
    name = str(value).strip().lower()
    name = "no" if name in _FP32_NAMES else name
    if name not in DTYPES:
        raise ValueError(f"{key}={value!r}: expected 'no' (fp32), 'fp16' or 'bf16'")
    return name


def torch_dtype(value, key: str) -> torch.dtype:
    """The torch dtype of a precision name (see :func:`precision_name`)."""
    return DTYPES[precision_name(value, key)]
