"""Atomic file writes: a crash never leaves a half-written file under the final name."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from lorakit.outputs import clean_stale


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _atomic(path: str | os.PathLike, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent, path.name)  # temp files a killed writer left for this name (older than an hour)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None):
    """Write ``tensors`` to ``path`` as safetensors (contiguous, CPU copies), atomically. Returns the path."""
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return _atomic(path, lambda tmp: save_file(clean, tmp, metadata=meta))


def save_image(image, path: str | os.PathLike) -> Path:
    """Save a PIL image as PNG, atomically. Returns the path."""
    return _atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` atomically (``dst`` appears whole or not at all). Returns ``dst``."""
    import shutil

    return _atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write a text file atomically."""
    return _atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json(obj, path: str | os.PathLike) -> Path:
    """Write an object as indented JSON, atomically."""
    return write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file into (tensors, metadata).

    Raises:
        FileNotFoundError if it does not exist; ValueError naming the file if it is truncated or not safetensors.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
        size = path.stat().st_size
        raise ValueError(
            f"{path}: not a readable .safetensors file ({size} bytes; truncated or corrupt?): {err}"
        ) from err
    return tensors, meta
