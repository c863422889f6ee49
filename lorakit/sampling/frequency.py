"""Frequency profiling of adapters (CMLoRA step 1): which adapters amplify high frequencies (edges, texture) and
which shape low frequencies (layout, colour).

For each adapter alone, images are generated; each image's grayscale 2-D FFT gives a log amplitude spectrum
``log(1 + |F|)``, normalised by its maximum (the DC term for natural images) and averaged over rings of equal
radius. The adapter's score is the mean of that radial profile over the high radii (``r >= high_cutoff * r_max``),
averaged over its images. Scores are measured, never looked up from a category table.

Profiles are cached in a JSON file beside the adapter (``<file>.profile.json``), keyed by the file's SHA-256 and the
profiling settings (base, prompt, steps, seeds, size, cutoff).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lorakit import fileio  # looked up at call time: tests replace fileio.write_json
from lorakit.logs import tqdm, warn
from lorakit.sampling.composer import SamplerSettings, generate

PROFILE_VERSION = "1"


def grayscale(image) -> torch.Tensor:
    """PIL image / ``[H, W, 3]`` uint8 array -> ``[H, W]`` float64 luminance in [0, 1] (ITU-R 601 weights)."""
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim == 3:
        arr = arr[..., :3] @ np.array([0.299, 0.587, 0.114])
    return torch.from_numpy(arr / 255.0)


def radial_profile(gray: torch.Tensor) -> torch.Tensor:
    """Radially averaged normalised log amplitude of a ``[H, W]`` image.

    Returns:
        ``[R]`` with ``R = min(H, W) // 2 + 1``; entry r is the mean of ``log(1+|F|) / max`` over frequencies whose
        distance from the centre (after fftshift) rounds to r.
    """
    h, w = gray.shape
    amp = torch.log1p(torch.fft.fftshift(torch.fft.fft2(gray)).abs())
    amp = amp / amp.max().clamp(min=1e-12)
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    radius = torch.sqrt(yy.double() ** 2 + xx.double() ** 2).round().long()
    n_r = min(h, w) // 2 + 1
    keep = radius < n_r
    sums = torch.zeros(n_r, dtype=amp.dtype).index_add_(0, radius[keep], amp[keep])
    counts = torch.zeros(n_r, dtype=amp.dtype).index_add_(0, radius[keep], torch.ones_like(amp[keep]))
    return sums / counts.clamp(min=1)


def high_frequency_score(image, high_cutoff: float = 0.5) -> float:
    """Mean of the radial profile over radii ``>= high_cutoff * r_max`` (the CMLoRA high-frequency score)."""
    if not 0.0 < high_cutoff < 1.0:
        raise ValueError(f"high_cutoff must be in (0, 1), got {high_cutoff}")
    prof = radial_profile(grayscale(image))
    start = int(np.ceil(high_cutoff * (len(prof) - 1)))
    return float(prof[start:].mean())


@dataclass
class ProfileSettings:
    """What a profile depends on besides the adapter file (part of the cache key)."""

    base: str
    prompt: str = "a picture"
    negative_prompt: str = ""
    steps: int = 20
    cfg: float = 7.5
    seeds: tuple[int, ...] = (0, 1)
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    high_cutoff: float = 0.5

    def key(self, file_sha: str) -> str:
        blob = json.dumps({**asdict(self), "v": PROFILE_VERSION}, sort_keys=True, default=list)
        return f"{file_sha[:16]}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def profile_path(adapter_path: str | Path) -> Path:
    """The JSON cache beside an adapter file."""
    p = Path(adapter_path)
    return p.with_name(p.name + ".profile.json")


def read_cached(adapter_path, key: str) -> dict | None:
    """A cached profile entry for ``key`` or None (a damaged cache file counts as absent)."""
    path = profile_path(adapter_path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("entries", {}).get(key)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None


def write_cached(adapter_path, key: str, entry: dict) -> Path | None:
    """Add/replace one entry in the adapter's profile JSON (atomic write). Returns None, with one warning, where
    the cache cannot be written (a read-only folder) or the file there is not a lorakit profile (never replaced):
    the profile is then recomputed next time."""
    path = profile_path(adapter_path)
    data = {"entries": {}}
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            warn(f"{path} is not a lorakit profile cache; left as it is (profile not cached)")
            return None
    data["entries"][key] = entry
    try:
        return fileio.write_json(data, path)
    except OSError as err:
        warn(f"cannot cache the profile at {path} ({err.strerror or err}); it is recomputed next time")
        return None


def profile_adapters(pipe, adapters, settings: ProfileSettings, use_cache: bool = True, progress: bool = True) -> dict:
    """Frequency score of each adapter, generating images with that adapter alone (merge of one adapter).

    Args:
        pipe: the base pipeline with ``adapters`` loaded (:func:`lorakit.sampling.composer.load_adapters`).
        adapters: :class:`~lorakit.sampling.composer.LoadedAdapter` list.
        settings: profiling settings (also the cache key).
        use_cache: read/write ``<file>.profile.json``.
    Returns:
        ``{adapter name: {'score', 'radial' [R], 'cached', 'key', 'path'}}``.
    """
    out = {}
    for ad in tqdm(adapters, desc="profile", disable=not progress):
        key = settings.key(ad.sha256)
        entry = read_cached(ad.path, key) if use_cache else None
        cached = entry is not None
        if entry is None:
            sampler = SamplerSettings(
                method="merge", steps=settings.steps, cfg=settings.cfg, width=settings.width, height=settings.height,
                scheduler=settings.scheduler,
            )
            images, _ = generate(pipe, [ad], sampler, settings.prompt, settings.negative_prompt, list(settings.seeds))
            radials = [radial_profile(grayscale(im)) for im in images]
            scores = [high_frequency_score(im, settings.high_cutoff) for im in images]
            entry = {
                "score": float(np.mean(scores)),
                "scores": scores,
                "radial": torch.stack(radials).mean(0).tolist(),
                "sha256": ad.sha256,
                "settings": asdict(settings),
            }
            if use_cache:
                write_cached(ad.path, key, entry)
        out[ad.name] = {**entry, "cached": cached, "key": key, "path": ad.path}
    return out


def order_by_frequency(scores: list[float], order: str = "high-first") -> tuple[list[int], list[str]]:
    """Dominance order and high/low grouping from the scores.

    The high group is every adapter whose score is at least the median; the order lists the high group then the
    low group, each by score (``high-first``), or the reverse (``low-first``); ``given`` keeps the input order.

    Returns:
        ``(order as indices, group per adapter 'high'|'low')``.
    """
    if not scores:
        return [], []
    med = float(np.median(scores))
    groups = ["high" if s >= med else "low" for s in scores]
    by_score = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if order == "high-first":
        return by_score, groups
    if order == "low-first":
        return by_score[::-1], groups
    if order == "given":
        return list(range(len(scores))), groups
    raise ValueError(f"order must be high-first, low-first or given, got {order!r}")
