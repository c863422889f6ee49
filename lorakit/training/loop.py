"""The shared Accelerate training loop used by every lorakit trainer (block-wise LoRA, ED-LoRA, LoRA.rar, toy base).

A trainer builds its models, says which parameters train, and hands the loop three callables; the loop does the
rest: ``accelerator.prepare``, gradient accumulation, clipping, the diffusers LR scheduler with warmup, NaN
detection, pickle-free checkpoints (:mod:`lorakit.training.state`) with exact resume (``resume: latest``), periodic artifacts
and samples, a tqdm bar (loss, lr, it/s), tensorboard logs and a final summary.

Example (a complete trainer; ``MyConfig`` extends :class:`TrainConfig` with the recipe's own keys)::

    from dataclasses import dataclass
    from lorakit.config import load_config
    from lorakit.training.loop import TrainConfig, TrainLoop, build_optimizer, make_accelerator, randn_per_sample

    @dataclass
    class MyConfig(TrainConfig):
        my_key: int = 3

    cfg = load_config(MyConfig, "train_configs/x.yaml", ["max_steps=100"])
    accelerator = make_accelerator(cfg)                     # mixed precision, grad accumulation, tensorboard
    model = build_model(cfg)                                 # requires_grad only on what trains
    optimizer = build_optimizer(cfg, [{"params": [p for p in model.parameters() if p.requires_grad]}])
    dataset = MyDataset(...)                                 # dataset[i] -> dict of tensors

    def compute_loss(batch, step, models):                   # models = the PREPARED modules (DDP-wrapped)
        noise = randn_per_sample(batch["x"].shape[1:], batch["sample_id"], cfg.seed, salt=0,
                                 device=batch["x"].device)   # per-sample draws: same on 1 or N processes
        return torch.nn.functional.mse_loss(models[0](batch["x"] + noise), batch["y"])

    def save(path):                                          # main process only; write atomically
        save_my_artifact(model, path)

    result = TrainLoop(cfg, accelerator, [model], optimizer, dataset, compute_loss, save).run()
    print(result.final_path, result.losses[-1])

Contract details:
  * ``compute_loss(batch, step)`` or ``compute_loss(batch, step, models)`` returns the mean loss of this process's
    micro-batch (a scalar tensor). Call the models given (the prepared ones), not the originals: DDP needs it.
    ``batch["sample_id"]`` (LongTensor [b]) numbers every sample of the run globally and identically for any
    number of processes; draw noise/timesteps with :func:`randn_per_sample` / :func:`randint_per_sample` keyed
    by it, and a run on 2 processes x batch b equals a run on 1 process x batch 2b.
  * The dataset: ``dataset[i]`` returns a dict; if it defines ``get_item(i, sample_id)`` that is called instead
    (for per-sample random augmentation). If it defines ``buckets() -> list[list[int]]`` every global batch
    is drawn from one bucket (aspect-ratio buckets). Batches are collated with ``collate_fn`` (default: torch's).
  * ``save(path)`` writes the trainer's artifact (adapter ``.safetensors``, or a folder when
    ``artifact_suffix=""``). It runs on the main process every ``save_every`` steps
    (``<output_dir>/<output_name>-step000100.safetensors``) and at the end (``<output_dir>/<output_name>.safetensors``,
    then the newest file there).
  * ``sample(step) -> list[PIL.Image] | None`` (optional) runs on the main process every ``sample_every`` steps
    with the models in eval mode and the global RNG state forked (sampling never changes training); the loop
    saves the images as a grid in ``<output_dir>/samples/step000100.png`` and logs it to tensorboard.
  * Checkpoints: ``<output_dir>/checkpoints/checkpoint-<step>/`` (safetensors + JSON, no pickle: trainable
    parameters only, optimizer, LR scheduler, grad scaler, RNG states, the run identity) every
    ``checkpointing_steps`` and at the end. ``resume: latest`` continues this run's newest checkpoint bit-exactly
    (the data order is a pure function of (seed, position), and the position is restored); another run's
    checkpoints are refused, and a new run into a folder holding one needs ``overwrite: true``.
  * ``output_dir`` gets a marker file and a lock (a second run into it fails at once); a non-empty folder
    lorakit did not write is refused before any model loads.
  * A non-finite loss, or non-finite weights about to be saved, raise :class:`TrainingDiverged` naming the step
    and the last good checkpoint (one whose weights were followed by a finite loss); a checkpoint written just
    before the divergence is renamed ``diverged-checkpoint-N``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lorakit.precision import precision_name
from lorakit.rng import mix_seed, rand_per_sample, randint_per_sample, randn_per_sample, sample_generator
from lorakit.training.recipes import TrainConfig

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LOOP_STATE_FILE = "lorakit_loop.json"


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""




@dataclass
class TrainResult:
    """What a run produced. ``losses``: mean loss of every optimizer step of this run (all processes)."""

    final_path: Path | None
    global_step: int
    losses: list[float]
    checkpoint: Path | None
    seconds: float
    samples: list[Path] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)  # wall time of every optimizer step (benchmarks)


# ------------------------------------------------------------------------------------------------ helpers


def mixed_precision(cfg) -> str:
    """``cfg.mixed_precision`` as ``no``/``fp16``/``bf16`` (YAML reads a bare ``no`` as false)."""
    return precision_name(cfg.mixed_precision, "mixed_precision")


def make_accelerator(cfg, find_unused_parameters: bool = False, **kwargs):
    """An ``Accelerator`` for a config: mixed precision, gradient accumulation, tensorboard under
    ``<output_dir>/logs``, and ``find_unused_parameters`` for DDP when some trainable parameter may get no
    gradient (e.g. SDXL text-encoder LoRA on the unused last layer)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

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
        print(f"lorakit: optimizer adamw8bit unavailable ({reason}); falling back to torch AdamW (32-bit)", file=sys.stderr)
    elif name != "adamw":
        raise ValueError(f"optimizer={cfg.optimizer!r}: expected 'adamw' or 'adamw8bit'")
    return torch.optim.AdamW(groups, fused=True if cuda else None, **kw)


class GlobalBatchSampler:
    """Batch sampler that gives this process its slice of every global batch.

    Each epoch shuffles every group (bucket) with a generator seeded by (seed, epoch), pads it to a multiple of
    the global batch by cycling, cuts global batches of ``batch_size * num_processes``, and shuffles their order.
    Process ``p`` takes positions ``[p*b, (p+1)*b)`` of each global batch, so 1 process x 2b and 2 processes x b
    see the same global batches. Yields lists of ``(dataset index, sample id)``; the sample id of position ``j``
    of micro-batch ``m`` is ``m * global_batch + j``. ``start`` = micro-batches already consumed (resume).
    """

    def __init__(self, groups: Sequence[Sequence[int]], batch_size: int, num_processes: int = 1,
                 process_index: int = 0, seed: int = 0, start: int = 0):
        self.groups = [list(g) for g in groups if len(g)]
        if not self.groups:
            raise ValueError("the dataset is empty: nothing to sample")
        if batch_size < 1:
            raise ValueError(f"train_batch_size must be >= 1, got {batch_size}")
        self.b, self.world, self.rank = batch_size, num_processes, process_index
        self.global_batch = batch_size * num_processes
        self.seed, self.start = seed, start
        self.batches_per_epoch = sum(math.ceil(len(g) / self.global_batch) for g in self.groups)
        self._cache: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches (dataset indices) of one epoch, in order."""
        if self._cache and self._cache[0] == epoch:
            return self._cache[1]
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 7))
        batches = []
        for group in self.groups:
            perm = [group[i] for i in torch.randperm(len(group), generator=gen).tolist()]
            n = math.ceil(len(perm) / self.global_batch) * self.global_batch
            padded = (perm * math.ceil(n / len(perm)))[:n]
            batches += [padded[i : i + self.global_batch] for i in range(0, n, self.global_batch)]
        order = torch.randperm(len(batches), generator=gen).tolist()
        batches = [batches[i] for i in order]
        self._cache = (epoch, batches)
        return batches

    def __iter__(self):
        m = self.start
        while True:
            epoch, k = divmod(m, self.batches_per_epoch)
            share = self.epoch_batches(epoch)[k][self.rank * self.b : (self.rank + 1) * self.b]
            base = m * self.global_batch + self.rank * self.b
            yield [(idx, base + j) for j, idx in enumerate(share)]
            m += 1


class _KeyedDataset(torch.utils.data.Dataset):
    """Calls ``get_item(i, sample_id)`` (or ``[i]``) and adds ``sample_id`` to the item."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.keyed = hasattr(dataset, "get_item")

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, sample_id = key
        item = self.dataset.get_item(index, sample_id) if self.keyed else self.dataset[index]
        item = dict(item)
        item["sample_id"] = sample_id
        return item


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
    flat = _flat_config(cfg) if not isinstance(cfg, dict) else dict(cfg)
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


def _checkpoint_run(path: Path) -> tuple[str | None, dict]:
    try:
        info = json.loads((path / LOOP_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, {}
    return info.get("run_id"), info.get("config") or {}


def _differing(a: dict, b: dict) -> str:
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
    mixed_precision(cfg)


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
    from lorakit.outputs import check_add_dir
    from lorakit.training.state import check_folder

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
        if found and _checkpoint_run(found[-1][1]) == (None, {}):
            check_folder(found[-1][1])  # the newest is unreadable: say so rather than fall back silently
        mine = run_identity(cfg)
        own = [p for _, p in found if _checkpoint_run(p)[0] == mine]
        if own:
            check_folder(own[-1])
            return own[-1]
        if found:
            newest = found[-1][1]
            raise ValueError(
                f"resume=latest: the checkpoints in {out / 'checkpoints'} (newest {newest.name}) belong to another "
                f"run ({_differing(_checkpoint_run(newest)[1], run_config(cfg))}); continue that run with its own "
                f"settings, resume=<path> to continue it explicitly, or overwrite=true / another output_dir"
            )
        return None
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint folder")
    check_folder(path)
    return path


def _flat_config(cfg) -> dict[str, Any]:
    from lorakit.config import to_dict

    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)

    walk(to_dict(cfg) if not isinstance(cfg, dict) else cfg, "")
    return out


# ------------------------------------------------------------------------------------------------ the loop


class TrainLoop:
    """One training run. See the module docstring for the contract and an example.

    Args:
        cfg: a :class:`TrainConfig` (or subclass) DictConfig/dataclass.
        accelerator: from :func:`make_accelerator`.
        models: the modules that hold trainable parameters (UNet, text encoders, an embedding module, ...).
        optimizer: over their trainable parameters (:func:`build_optimizer`).
        dataset: see the module docstring.
        compute_loss / save / sample: the trainer's callables.
        collate_fn: batch collation (default torch's ``default_collate``).
        artifact_suffix: ``.safetensors`` for adapter files; ``""`` when ``save`` writes a folder.
        summary_hint: extra lines for the end-of-run summary (e.g. how to sample the result).
    """

    def __init__(self, cfg, accelerator, models: Sequence[torch.nn.Module], optimizer, dataset,
                 compute_loss: Callable, save: Callable[[Path], Any] | None,
                 sample: Callable[[int], Any] | None = None, collate_fn: Callable | None = None,
                 artifact_suffix: str = ".safetensors", summary_hint: str = ""):
        self.cfg, self.accelerator = cfg, accelerator
        self.raw_models = list(models)
        self.optimizer, self.dataset = optimizer, dataset
        self.compute_loss, self.save_fn, self.sample_fn = compute_loss, save, sample
        self.collate_fn = collate_fn
        self.artifact_suffix, self.summary_hint = artifact_suffix, summary_hint
        self.output_dir = Path(cfg.output_dir)
        self.global_step = 0
        self.last_checkpoint: Path | None = None  # newest checkpoint written or resumed from
        self.good_checkpoint: Path | None = None  # newest one whose weights gave a finite loss afterwards
        self.pending_checkpoint: Path | None = None  # written, not yet followed by a finite loss
        self.resumed_from: Path | None = None
        self.run_id = run_identity(cfg)
        self._lock = None
        self._loss_takes_models = len(inspect.signature(compute_loss).parameters) >= 3
        self.resume_path = preflight(cfg)

    def _trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _prepare(self):
        from diffusers.optimization import get_scheduler

        cfg, acc = self.cfg, self.accelerator
        if cfg.gradient_checkpointing:
            for m in self.raw_models:
                fn = getattr(m, "enable_gradient_checkpointing", None) or getattr(m, "gradient_checkpointing_enable", None)
                if fn is None:
                    acc.print(f"lorakit: {type(m).__name__} has no gradient checkpointing; running without it")
                else:
                    fn()
        # The scheduler steps once per optimizer step, on every process alike (not through accelerate, which
        # would step it num_processes times): 1 process x 2b and 2 processes x b get the same learning rates.
        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=cfg.max_steps, num_cycles=cfg.lr_num_cycles,
        )
        prepared = acc.prepare(*self.raw_models, self.optimizer)
        self.models, self.optimizer = list(prepared[:-1]), prepared[-1]

    def _loader(self, start_micro: int):
        groups = self.dataset.buckets() if hasattr(self.dataset, "buckets") else [list(range(len(self.dataset)))]
        sampler = GlobalBatchSampler(
            groups, self.cfg.train_batch_size, self.accelerator.num_processes, self.accelerator.process_index,
            seed=self.cfg.seed, start=start_micro,
        )
        self.sampler = sampler
        loader = torch.utils.data.DataLoader(
            _KeyedDataset(self.dataset), batch_sampler=sampler, collate_fn=self.collate_fn,
            num_workers=self.cfg.dataloader_num_workers, persistent_workers=False,
            # its own generator: creating the iterator draws a base seed, which must not move the global RNG
            # (restored by load_state on resume) — else LoRA dropout masks differ after a resume
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )
        return iter(loader)

    # -- output folder: marker, lock, a fresh start
    def _claim_output(self) -> None:
        """Main process: mark output_dir as lorakit's, take its lock (a second run into it fails at once), and
        on ``overwrite=true`` remove the earlier run's checkpoints (lorakit wrote them)."""
        import fcntl

        from lorakit.outputs import claim_dir

        acc, cfg = self.accelerator, self.cfg
        if acc.is_main_process:
            claim_dir(self.output_dir, kind="training", flag="output_dir")
            lock = open(self.output_dir / ".lorakit.lock", "a+")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.close()
                raise ValueError(f"output_dir {self.output_dir} is in use by another lorakit run (its lock "
                                 f"{self.output_dir / '.lorakit.lock'} is held); wait for it or choose another "
                                 "output_dir") from None
            self._lock = lock
            root = self.output_dir / "checkpoints"
            if root.is_dir():
                for p in root.glob(".tmp-checkpoint-*"):  # a killed run's half-written checkpoint (we hold the lock)
                    shutil.rmtree(p, ignore_errors=True)
            if self.resume_path is None and cfg.overwrite and not cfg.resume:
                for _, p in checkpoints(self.output_dir):
                    if (p / LOOP_STATE_FILE).is_file():
                        shutil.rmtree(p)
        acc.wait_for_everyone()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- checkpoints (no pickle: lorakit.training.state)
    def _resume(self) -> None:
        from lorakit.training import state as S

        cfg, acc = self.cfg, self.accelerator
        path = self.resume_path
        if path is None:
            if cfg.resume and str(cfg.resume) == "latest":
                acc.print(f"lorakit: resume=latest but {self.output_dir / 'checkpoints'} has no checkpoint of this "
                          "run; starting at step 0")
            return
        ignored = S.check_folder(path)
        if ignored:
            acc.print(f"lorakit: ignoring {', '.join(ignored)} in {path} (lorakit never loads pickle files)")
        info = S.read_loop_info(path)
        if info.get("run_id") not in (None, self.run_id):
            acc.print(f"lorakit: warning: {path} was made by a run with other settings "
                      f"({_differing(info.get('config') or {}, run_config(cfg))}); continuing it as asked")
        if info.get("train_batch_size_global") not in (None, cfg.train_batch_size * acc.num_processes):
            acc.print(
                f"lorakit: warning: checkpoint was made with global batch {info['train_batch_size_global']}, "
                f"now {cfg.train_batch_size * acc.num_processes}; the data order will differ"
            )
        S.load_model_state(self.raw_models, self.optimizer, self.lr_scheduler, getattr(acc, "scaler", None), path)
        rank = acc.process_index
        if (path / f"rng-{rank}.json").is_file():
            S.load_rng_state(path, rank)
        else:
            acc.print(f"lorakit: warning: {path} has no random state for process {rank}; dropout draws will differ")
        self.global_step = int(info["global_step"])
        self.last_checkpoint = self.resumed_from = path
        acc.print(f"lorakit: resumed from {path} at step {self.global_step}")

    def _check_weights(self) -> None:
        """Never save non-finite weights: stop naming the parameter and the last good checkpoint."""
        from lorakit.training.state import nonfinite

        bad = nonfinite(self.raw_models)
        if bad is not None:
            self._diverged(f"trainable parameter {bad.split(':', 1)[1]} holds NaN/inf after step {self.global_step}")

    def _checkpoint(self) -> Path:
        from lorakit.fileio import write_json
        from lorakit.training import state as S

        acc, cfg = self.accelerator, self.cfg
        self._check_weights()
        root = self.output_dir / "checkpoints"
        final = root / f"checkpoint-{self.global_step}"
        tmp = root / f".tmp-checkpoint-{self.global_step}"
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            S.save_model_state(self.raw_models, self.optimizer, self.lr_scheduler, getattr(acc, "scaler", None), tmp)
        S.save_rng_state(tmp, acc.process_index)
        acc.wait_for_everyone()
        if acc.is_main_process:
            # written last: a folder without it is incomplete and never resumed
            write_json({"format": S.FORMAT, "global_step": self.global_step, "run_id": self.run_id,
                        "config": run_config(cfg),
                        "train_batch_size_global": cfg.train_batch_size * acc.num_processes}, tmp / LOOP_STATE_FILE)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._rotate(root)
        acc.wait_for_everyone()
        self.last_checkpoint = self.pending_checkpoint = final
        return final

    def _rotate(self, root: Path) -> None:
        """Keep this run's newest ``checkpoints_total_limit`` checkpoints and always the last verified one;
        another run's checkpoints are never touched."""
        limit = self.cfg.checkpoints_total_limit
        if not limit:
            return
        own = [p for _, p in checkpoints(self.output_dir) if _checkpoint_run(p)[0] == self.run_id]
        keep = set(own[-limit:]) | {self.good_checkpoint}
        if self.good_checkpoint is None:
            keep.add(self.resumed_from)  # until a newer one is known good
        for old in own:
            if old not in keep:
                shutil.rmtree(old, ignore_errors=True)

    def _verified(self) -> None:
        """The weights of the pending checkpoint just gave a finite loss: it is good."""
        if self.pending_checkpoint is not None:
            self.good_checkpoint, self.pending_checkpoint = self.pending_checkpoint, None
            if self.accelerator.is_main_process:
                self._rotate(self.output_dir / "checkpoints")

    # -- artifacts and samples (main process)
    def artifact_path(self, step: int | None = None) -> Path:
        """``<output_dir>/<output_name>[-stepNNNNNN]<suffix>``."""
        tag = "" if step is None else f"-step{step:06d}"
        return self.output_dir / f"{self.cfg.output_name}{tag}{self.artifact_suffix}"

    def _save_artifact(self, step: int | None) -> Path | None:
        acc = self.accelerator
        self._check_weights()
        acc.wait_for_everyone()
        path = self.artifact_path(step)
        if acc.is_main_process and self.save_fn is not None:
            self.save_fn(path)
            if step is None and path.is_file():
                # The final artifact must be the newest .safetensors in output_dir, even on coarse-mtime filesystems.
                others = [p.stat().st_mtime_ns for p in self.output_dir.glob(f"*{self.artifact_suffix}") if p != path]
                if others and max(others) >= path.stat().st_mtime_ns:
                    t = max(others) + 1_000_000
                    os.utime(path, ns=(t, t))
        acc.wait_for_everyone()
        return path if self.save_fn is not None else None

    def _sample(self) -> Path | None:
        acc = self.accelerator
        out = None
        if acc.is_main_process and self.sample_fn is not None:
            from diffusers.utils import make_image_grid

            from lorakit.fileio import save_image

            for m in self.raw_models:
                m.eval()
            devices = [acc.device] if acc.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                images = self.sample_fn(self.global_step)
            for m in self.raw_models:
                m.train()
            if images:
                cols = min(len(images), 4)
                rows = math.ceil(len(images) / cols)
                images = list(images) + [images[0].copy().point(lambda _: 0)] * (rows * cols - len(images))
                grid = make_image_grid(images, rows=rows, cols=cols)
                out = self.output_dir / "samples" / f"step{self.global_step:06d}.png"
                save_image(grid, out)
                self._log_image(grid)
        acc.wait_for_everyone()
        return out

    def _log_image(self, grid) -> None:
        if self.cfg.logging != "tensorboard":
            return
        import numpy as np

        try:
            tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
            tracker.add_image("samples", np.asarray(grid), self.global_step, dataformats="HWC")
        except Exception as err:  # noqa: BLE001 - a logging failure must not stop training
            self.accelerator.print(f"lorakit: could not log the sample grid to tensorboard: {err}")

    # -- the run
    def run(self) -> TrainResult:
        """Train to ``max_steps`` (or ``stop_at_step``); see the module docstring."""
        t0 = time.perf_counter()
        self._claim_output()
        try:
            return self._run(t0)
        finally:
            self._release()

    def _run(self, t0: float) -> TrainResult:
        from accelerate.utils import send_to_device
        from lorakit.logs import tqdm

        acc, cfg = self.accelerator, self.cfg
        self._prepare()
        self._resume()
        if cfg.logging == "tensorboard":
            acc.init_trackers("lorakit", config=_flat_config(cfg))
        accum = cfg.gradient_accumulation_steps
        data = self._loader(self.global_step * accum)
        acc.step = self.global_step * accum  # accelerate's accumulation counter, aligned with the restored step
        for m in self.models:
            m.train()
        params = self._trainable_params()
        losses: list[float] = []
        samples: list[Path] = []
        start_step = self.global_step
        bar = tqdm(total=cfg.max_steps, initial=self.global_step, desc="train", unit="step",
                   disable=not acc.is_local_main_process, dynamic_ncols=True)
        end = min(cfg.max_steps, cfg.stop_at_step) if cfg.stop_at_step > 0 else cfg.max_steps
        step_seconds: list[float] = []
        while self.global_step < end:
            t_step = time.perf_counter()
            micro_losses = []
            for _ in range(accum):
                batch = send_to_device(next(data), acc.device)
                with acc.accumulate(*self.models):
                    args = (batch, self.global_step, self.models) if self._loss_takes_models else (batch, self.global_step)
                    loss = self.compute_loss(*args)
                    micro_losses.append(loss.detach().float())
                    acc.backward(loss)
                    if acc.sync_gradients:
                        step_loss = acc.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
                        if not math.isfinite(step_loss):
                            self._diverged(f"loss is {step_loss} at step {self.global_step + 1}")
                        self._verified()
                        if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                            acc.clip_grad_norm_(params, cfg.max_grad_norm)
                        self.optimizer.step()
                        self.lr_scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            step_seconds.append(time.perf_counter() - t_step)  # .item() above synchronised the device
            losses.append(step_loss)
            lr = self.lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            if cfg.logging == "tensorboard" and self.global_step % max(1, cfg.log_every) == 0:
                acc.log({"loss": step_loss, "lr": lr}, step=self.global_step)
            last = self.global_step == end
            if cfg.save_every and self.global_step % cfg.save_every == 0 and not last:
                self._save_artifact(self.global_step)
            if cfg.checkpointing_steps and self.global_step % cfg.checkpointing_steps == 0 and not last:
                self._checkpoint()
            if cfg.sample_every and (self.global_step % cfg.sample_every == 0 or last):
                s = self._sample()
                if s:
                    samples.append(s)
        bar.close()
        final = self._save_artifact(None if self.global_step >= cfg.max_steps else self.global_step)
        at_end = cfg.checkpoint_at_end
        if at_end is None:  # checkpointing_steps: 0 means no checkpoint, unless the run stops early to resume
            at_end = cfg.checkpointing_steps > 0 or self.global_step < cfg.max_steps
        if at_end and self.global_step > start_step:
            self._checkpoint()
        if cfg.logging == "tensorboard":
            acc.end_training()
        result = TrainResult(final, self.global_step, losses, self.last_checkpoint, time.perf_counter() - t0, samples,
                             step_seconds)
        self._summary(result, start_step)
        return result

    def _diverged(self, what: str):
        """Stop: name the real last good checkpoint. A checkpoint whose weights led straight to this (written
        after the last finite loss) is renamed ``diverged-checkpoint-N`` so resume=latest never picks it."""
        cfg, acc = self.cfg, self.accelerator
        note = ""
        bad = self.pending_checkpoint
        if bad is not None and bad != self.resumed_from:
            moved = bad.with_name(f"diverged-{bad.name}")
            if acc.is_main_process and bad.exists():
                if moved.exists():
                    shutil.rmtree(moved)
                bad.rename(moved)
            note = f" ({bad.name} was written just before and renamed {moved.name})"
        if self.good_checkpoint is not None:
            where = str(self.good_checkpoint)
        elif self.resumed_from is not None:
            where = f"none known ({self.resumed_from}, resumed from, leads straight to this)"
        elif bad is not None:
            where = "none"
        elif cfg.checkpointing_steps:
            where = f"none yet (the first was due at step {cfg.checkpointing_steps})"
        else:
            where = "none (checkpointing_steps=0: set it to keep some)"
        self._release()
        raise TrainingDiverged(
            f"{what}: training stopped. Last good checkpoint: {where}{note}. "
            "Lower learning_rate, use bf16 instead of fp16, or check the data; resume with resume=<checkpoint>."
        )

    def _summary(self, result: TrainResult, start_step: int) -> None:
        acc = self.accelerator
        steps = result.global_step - start_step
        lines = [
            f"lorakit: trained {steps} steps (to step {result.global_step}) in {result.seconds:.1f} s"
            + (f", final loss {result.losses[-1]:.4f}" if result.losses else ""),
        ]
        if result.final_path:
            lines.append(f"  final artifact:  {result.final_path}")
        if result.checkpoint:
            lines.append(f"  last checkpoint: {result.checkpoint}  (continue with resume=latest and a larger max_steps)")
        if result.samples:
            lines.append(f"  samples:         {result.samples[-1].parent}")
        if self.cfg.logging == "tensorboard":
            lines.append(f"  tensorboard:     tensorboard --logdir {self.output_dir / 'logs'}")
        if self.summary_hint:
            lines.append(self.summary_hint)
        acc.print("\n".join(lines))


__all__ = [
    "TrainConfig", "TrainLoop", "TrainResult", "TrainingDiverged", "GlobalBatchSampler", "make_accelerator",
    "build_optimizer", "mixed_precision", "sample_generator", "randn_per_sample", "randint_per_sample", "rand_per_sample",
    "latest_checkpoint",
]
