"""Per-sample random streams: every draw of a training sample is keyed by (seed, global sample id, salt).

Draws are made on the CPU with their own generator, so they are the same on every device, for any number of
processes, and after a resume (the data order numbers samples the same way each time).
"""

from __future__ import annotations

import hashlib

import torch


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (blake2b), so nearby inputs give unrelated streams."""
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_generator(seed: int, sample_id: int, salt: int = 0) -> torch.Generator:
    """A CPU generator for one sample's random draws, seeded by (seed, sample id, salt)."""
    return torch.Generator().manual_seed(mix_seed(seed, sample_id, salt))


def randn_per_sample(shape, sample_ids, seed: int, salt: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normal noise ``[b, *shape]``, row ``k`` drawn from ``sample_generator(seed, sample_ids[k], salt)``."""
    rows = [torch.randn(tuple(shape), generator=sample_generator(seed, int(i), salt)) for i in sample_ids]
    return torch.stack(rows).to(device=device, dtype=dtype)


def randint_per_sample(low: int, high: int, sample_ids, seed: int, salt: int = 1, device=None) -> torch.Tensor:
    """Integers in ``[low, high)``, one per sample (LongTensor ``[b]``), keyed like :func:`randn_per_sample`."""
    vals = [torch.randint(low, high, (1,), generator=sample_generator(seed, int(i), salt)) for i in sample_ids]
    return torch.cat(vals).to(device)


def rand_per_sample(sample_ids, seed: int, salt: int = 2, device=None) -> torch.Tensor:
    """Uniform floats in ``[0, 1)``, one per sample (``[b]``), keyed like :func:`randn_per_sample`."""
    vals = [torch.rand((1,), generator=sample_generator(seed, int(i), salt)) for i in sample_ids]
    return torch.cat(vals).to(device)
