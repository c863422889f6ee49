"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder ``checkpoint-N/`` holds::

    lorakit_loop.json          step, global batch, run identity, format (written last: its presence = complete)
    params.safetensors         trainable parameters, keys "<model index>:<parameter name>"
    optimizer.safetensors      optimizer state tensors, keys "<param index>:<state key>"
    optimizer.json             param_groups and the non-tensor optimizer state
    scheduler.json             the LR scheduler's state_dict (numbers and lists)
    scaler.json                the fp16 grad scaler's state_dict (only with mixed_precision=fp16)
    rng-<rank>.safetensors/.json   torch CPU/CUDA generator states / Python and NumPy states of each process

Nothing here calls ``pickle`` or ``torch.load``; a file with another suffix (``.pkl``, ``.bin``, ``.pt``,
``.pth``, ``.ckpt``) in a checkpoint folder is never opened.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import torch

from lorakit.fileio import load_safetensors, save_safetensors, write_text

FORMAT = "lorakit-checkpoint-2"
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint folder that lorakit cannot resume from; the message names the folder or file."""


def _jsonable(obj, where: str):
    if isinstance(obj, torch.Tensor):
        if obj.numel() != 1:
            raise CheckpointError(f"{where}: cannot store a {tuple(obj.shape)} tensor as JSON")
        return _jsonable(obj.item(), where)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, where) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    raise CheckpointError(f"{where}: a {type(obj).__name__} cannot be stored without pickle")


def _unjson(obj):
    if isinstance(obj, dict):
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        return {k: _unjson(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unjson(v) for v in obj]
    return obj


def _write_json(obj, path: Path) -> None:
    write_text(json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n", path)


def _read_json(path: Path):
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (an incomplete checkpoint?)")
    try:
        return _unjson(json.loads(path.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a lorakit checkpoint JSON file ({err.__class__.__name__})") from err


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (an incomplete checkpoint?)")
    tensors, _ = load_safetensors(path)
    return tensors


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_safetensors({k: v.detach().cpu().clone() for k, v in tensors.items()}, path)


def trainable_named(models) -> list[tuple[str, torch.nn.Parameter]]:
    """``("<model index>:<name>", parameter)`` for every trainable parameter of the (unwrapped) models."""
    return [(f"{i}:{n}", p) for i, m in enumerate(models) for n, p in m.named_parameters() if p.requires_grad]


def nonfinite(models) -> str | None:
    """The name of the first trainable parameter holding NaN/inf, or None."""
    for name, p in trainable_named(models):
        if not torch.isfinite(p.detach()).all():
            return name
    return None


# ------------------------------------------------------------------------------------------------ save


def save_model_state(models, optimizer, scheduler, scaler, folder: Path) -> None:
    """Main process: parameters, optimizer, scheduler, scaler into ``folder``."""
    _save_tensors({k: p for k, p in trainable_named(models)}, folder / "params.safetensors")
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> the torch optimizer
    sd = opt.state_dict()
    tensors, plain = {}, {}
    for idx, st in sd["state"].items():
        plain[str(idx)] = {}
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{idx}:{key}"] = val
            else:
                plain[str(idx)][key] = _jsonable(val, f"optimizer state {idx}.{key}")
    _save_tensors(tensors, folder / "optimizer.safetensors")
    _write_json({"param_groups": _jsonable(sd["param_groups"], "optimizer.param_groups"), "state": plain},
                folder / "optimizer.json")
    _write_json(_jsonable(scheduler.state_dict(), "scheduler"), folder / "scheduler.json")
    if scaler is not None:
        _write_json(_jsonable(scaler.state_dict(), "scaler"), folder / "scaler.json")


def save_rng_state(folder: Path, rank: int) -> None:
    """Every process: its torch (CPU, CUDA), Python and NumPy generator states."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = st
    _save_tensors(tensors, folder / f"rng-{rank}.safetensors")
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    _write_json({"python": [version, list(internal), gauss],
                 "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]},
                folder / f"rng-{rank}.json")


# ------------------------------------------------------------------------------------------------ load


def check_folder(folder: Path) -> list[str]:
    """Refuse a folder that is not a lorakit (no-pickle) checkpoint. Returns the names of files that are never
    loaded (pickles some other tool put there)."""
    if not folder.is_dir():
        raise CheckpointError(f"resume: {folder} is not a checkpoint folder")
    ignored = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    loop = folder / "lorakit_loop.json"
    info = _read_json(loop) if loop.is_file() else {}
    if info.get("format") != FORMAT:
        what = f"pickle files ({', '.join(ignored[:4])})" if ignored else "no lorakit state"
        raise CheckpointError(
            f"resume: {folder} is not a lorakit checkpoint of this version ({what}); lorakit never loads pickles, "
            "so it cannot resume from it: start a new run (another output_dir, or overwrite=true)"
        )
    return ignored


def load_model_state(models, optimizer, scheduler, scaler, folder: Path) -> None:
    """Restore what :func:`save_model_state` wrote; a parameter missing or of another shape is a clear error."""
    params = _read_tensors(folder / "params.safetensors")
    named = trainable_named(models)
    want = {k for k, _ in named}
    missing, extra = sorted(want - set(params)), sorted(set(params) - want)
    if missing or extra:
        example = (missing or extra)[0].split(":", 1)[1]
        raise CheckpointError(
            f"resume: {folder} was trained with other trainable parameters ({len(missing)} missing, {len(extra)} "
            f"unexpected, e.g. {example}); resume only with the same network settings (rank, blocks, text encoder)"
        )
    for key, p in named:
        t = params[key]
        if t.shape != p.shape:
            raise CheckpointError(
                f"resume: {folder}: {key.split(':', 1)[1]} is {list(t.shape)} in the checkpoint but {list(p.shape)} "
                "now; resume only with the same network settings (rank, blocks)"
            )
        with torch.no_grad():
            p.copy_(t.to(p.dtype))
    opt = getattr(optimizer, "optimizer", optimizer)
    meta = _read_json(folder / "optimizer.json")
    tensors = _read_tensors(folder / "optimizer.safetensors")
    state: dict[int, dict] = {}
    for key, val in tensors.items():
        idx, name = key.split(":", 1)
        state.setdefault(int(idx), {})[name] = val
    for idx, st in meta.get("state", {}).items():
        state.setdefault(int(idx), {}).update(st)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"resume: {folder}/optimizer.*: does not fit this run's optimizer ({err})") from err
    scheduler.load_state_dict(_read_json(folder / "scheduler.json"))
    if scaler is not None and (folder / "scaler.json").is_file():
        scaler.load_state_dict(_read_json(folder / "scaler.json"))


def load_rng_state(folder: Path, rank: int) -> None:
    tensors = _read_tensors(folder / f"rng-{rank}.safetensors")
    info = _read_json(folder / f"rng-{rank}.json")
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"cuda_{i}"] for i in range(len(tensors)) if f"cuda_{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = info["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def read_loop_info(folder: Path) -> dict:
    """``lorakit_loop.json`` of a checkpoint (step, global batch, run identity)."""
    return _read_json(folder / "lorakit_loop.json")


__all__ = ["FORMAT", "CheckpointError", "save_model_state", "save_rng_state", "load_model_state", "load_rng_state",
           "check_folder", "read_loop_info", "nonfinite", "trainable_named"]
