"""The accelerator and the optimizer of a training run."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

from lorakit.logs import warn
from lorakit.precision import precision_name


def mixed_precision(cfg) -> str:
    """``cfg.mixed_precision`` as ``no``/``fp16``/``bf16`` (YAML reads a bare ``no`` as false)."""
    return precision_name(cfg.mixed_precision, "mixed_precision")


def make_accelerator(cfg, find_unused_parameters: bool = False, **kwargs):
    """An ``Accelerator`` for a config: mixed precision, gradient accumulation, tensorboard under
    ``<output_dir>/logs``, and ``find_unused_parameters`` for DDP when some trainable parameter may get no
    gradient (e.g. SDXL text-encoder LoRA on the unused last layer)."""
    out = Path(cfg.output_dir)
    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs"))
    handlers = list(kwargs.pop("kwargs_handlers", []))
    if find_unused_parameters:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    if cfg.logging not in ("tensorboard", "none"):
        raise ValueError(f"logging={cfg.logging!r}: expected 'tensorboard' or 'none'")
    # Without a GPU, accelerate only forms a multi-process (gloo) group when told it runs on the CPU.
    kwargs.setdefault("cpu", not torch.cuda.is_available())
    acc = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=mixed_precision(cfg),
        log_with="tensorboard" if cfg.logging == "tensorboard" else None,
        project_config=project,
        kwargs_handlers=handlers,
        **kwargs,
    )
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and acc.num_processes != world:
        raise RuntimeError(
            f"launched as {world} processes but accelerate formed a group of {acc.num_processes}: every process "
            "would train alone and overwrite the same files; check the accelerate config / launch flags"
        )
    return acc


def build_optimizer(cfg, param_groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW (``optimizer: adamw``) or bitsandbytes 8-bit AdamW (``adamw8bit``) over ``param_groups``.

    Groups without ``lr`` get ``cfg.learning_rate``. 8-bit AdamW needs CUDA and bitsandbytes; elsewhere the
    run prints why and falls back to torch AdamW. On CUDA torch AdamW uses the fused kernel.
    """
    groups = [dict(g) for g in param_groups]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
        g.setdefault("lr", cfg.learning_rate)
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters: every parameter group is empty")
    kw = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    cuda = all(p.is_cuda for g in groups for p in g["params"])
    name = cfg.optimizer.lower().replace("-", "").replace("_", "")
    if name in ("adamw8bit", "adam8bit"):
        reason = None
        try:
            import bitsandbytes as bnb  # noqa: F401
        except ImportError:
            reason = "bitsandbytes is not installed (pip install bitsandbytes)"
        if reason is None and not (cuda or torch.cuda.is_available()):
            reason = "there is no CUDA GPU"
        if reason is None:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, **kw)
        warn(f"optimizer adamw8bit unavailable ({reason}); falling back to torch AdamW (32-bit)")
    elif name != "adamw":
        raise ValueError(f"optimizer={cfg.optimizer!r}: expected 'adamw' or 'adamw8bit'")
    return torch.optim.AdamW(groups, fused=True if cuda else None, **kw)
