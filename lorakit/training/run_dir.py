"""A training run's output folder: its checkpoints, the run identity that ties them to one run, and the checks
made before any model loads (config values, whether this run may write into ``output_dir``, what to resume)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from lorakit.config import to_dict
from lorakit.outputs import check_add_dir
from lorakit.precision import precision_name
from lorakit.training.state import check_folder

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LOOP_STATE_FILE = "lorakit_loop.json"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The ``checkpoint-N`` folder with the largest N under ``<output_dir>/checkpoints``, or None."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() for m in [CHECKPOINT_RE.match(p.name)] if m and p.is_dir()]
    return max(found)[1] if found else None


# Keys that may change between a run and its resumption (they do not change what the run computes per step).
RESUMABLE_KEYS = {
    "output_dir", "max_steps", "resume", "overwrite", "stop_at_step", "checkpointing_steps", "checkpoint_at_end",
    "checkpoints_total_limit", "save_every", "sample_every", "sample_prompts", "sample_num_inference_steps",
    "sample_guidance_scale", "sample_seed", "sample_resolution", "logging", "log_every", "dataloader_num_workers",
}


def run_config(cfg) -> dict[str, Any]:
    """The flat config that identifies a run (environment values left unresolved, resumable keys left out)."""
    flat = flat_config(cfg) if not isinstance(cfg, dict) else dict(cfg)
    return {k: v for k, v in flat.items() if k.split(".")[0] not in RESUMABLE_KEYS}


def run_identity(cfg) -> str:
    """A short hash of :func:`run_config`: checkpoints of one run carry it; ``resume=latest`` matches on it."""
    text = json.dumps(run_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every complete ``checkpoint-N`` folder under ``<output_dir>/checkpoints``, sorted by N."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() for m in [CHECKPOINT_RE.match(p.name)]
                  if m and p.is_dir())


def checkpoint_run(path: Path) -> tuple[str | None, dict]:
    try:
        info = json.loads((path / LOOP_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, {}
    return info.get("run_id"), info.get("config") or {}


def differing(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    if not keys:
        return "an older checkpoint format"
    shown = ", ".join(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def validate_config(cfg) -> None:
    """Values every trainer needs, checked before any model loads (one clear error each)."""
    checks = [
        ("max_steps", cfg.max_steps >= 1, ">= 1"),
        ("train_batch_size", cfg.train_batch_size >= 1, ">= 1"),
        ("gradient_accumulation_steps", cfg.gradient_accumulation_steps >= 1, ">= 1"),
        ("learning_rate", math.isfinite(cfg.learning_rate) and cfg.learning_rate > 0, "a positive number"),
        ("lr_warmup_steps", cfg.lr_warmup_steps >= 0, ">= 0"),
        ("max_grad_norm", math.isfinite(cfg.max_grad_norm) and cfg.max_grad_norm >= 0, ">= 0 (0 = no clipping)"),
        ("checkpointing_steps", cfg.checkpointing_steps >= 0, ">= 0 (0 = only at the end)"),
        ("save_every", cfg.save_every >= 0, ">= 0"),
        ("sample_every", cfg.sample_every >= 0, ">= 0"),
        ("dataloader_num_workers", cfg.dataloader_num_workers >= 0, ">= 0"),
    ]
    if cfg.text_encoder_lr is not None:
        checks.append(("text_encoder_lr", math.isfinite(cfg.text_encoder_lr) and cfg.text_encoder_lr > 0,
                       "a positive number"))
    if cfg.checkpoints_total_limit is not None:
        checks.append(("checkpoints_total_limit", cfg.checkpoints_total_limit >= 1, ">= 1 (or null for no limit)"))
    for key, ok, want in checks:
        if not ok:
            raise ValueError(f"{key}={getattr(cfg, key)!r}: expected {want}")
    precision_name(cfg.mixed_precision, "mixed_precision")


def preflight(cfg) -> Path | None:
    """Checks before any model loads: config values, and whether this run may write into ``output_dir``.

    * ``output_dir`` must be new, empty, or a folder lorakit wrote, and writable;
    * a new run (no ``resume``) into a folder that holds an earlier run's checkpoints or adapter is refused
      unless ``overwrite=true``;
    * ``resume=latest`` continues only checkpoints of this run (same :func:`run_identity`); another run's are
      refused (``resume=<path>`` continues one explicitly);
    * ``resume=<path>`` must be a lorakit checkpoint (no pickle is ever loaded).

    Returns the checkpoint to resume from, or None.
    """
    validate_config(cfg)
    out = Path(cfg.output_dir)
    check_add_dir(out, flag="output_dir")
    found = checkpoints(out)
    resume = str(cfg.resume).strip() if cfg.resume not in (None, "") else ""
    if not resume:
        artifacts = [p for p in (out / f"{cfg.output_name}.safetensors", out / cfg.output_name) if p.exists()]
        if (found or artifacts) and not cfg.overwrite:
            what = f"checkpoints up to {found[-1][1].name}" if found else f"the adapter {artifacts[0].name}"
            raise ValueError(
                f"output_dir {out} already holds an earlier run ({what}); continue it with resume=latest, start "
                "afresh with overwrite=true (removes its checkpoints), or choose another output_dir"
            )
        return None
    if resume == "latest":
        if found and checkpoint_run(found[-1][1]) == (None, {}):
            check_folder(found[-1][1])  # the newest is unreadable: say so rather than fall back silently
        mine = run_identity(cfg)
        own = [p for _, p in found if checkpoint_run(p)[0] == mine]
        if own:
            check_folder(own[-1])
            return own[-1]
        if found:
            newest = found[-1][1]
            raise ValueError(
                f"resume=latest: the checkpoints in {out / 'checkpoints'} (newest {newest.name}) belong to another "
                f"run ({differing(checkpoint_run(newest)[1], run_config(cfg))}); continue that run with its own "
                f"settings, resume=<path> to continue it explicitly, or overwrite=true / another output_dir"
            )
        return None
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint folder")
    check_folder(path)
    return path


def flat_config(cfg) -> dict[str, Any]:
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)

    walk(to_dict(cfg) if not isinstance(cfg, dict) else cfg, "")
    return out
