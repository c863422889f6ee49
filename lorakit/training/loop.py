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

import inspect
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from accelerate.utils import send_to_device
from diffusers.optimization import get_scheduler
from diffusers.utils import make_image_grid

from lorakit.fileio import save_image
from lorakit.logs import note, tqdm, warn
from lorakit.rng import (  # noqa: F401 - re-exported
    rand_per_sample,
    randint_per_sample,
    randn_per_sample,
    sample_generator,
)
from lorakit.training.batches import GlobalBatchSampler, KeyedDataset
from lorakit.training.checkpointing import Checkpointing, TrainingDiverged
from lorakit.training.recipes import TrainConfig
from lorakit.training.run_dir import (  # noqa: F401 - latest_checkpoint, CHECKPOINT_RE re-exported for callers
    CHECKPOINT_RE,
    LOOP_STATE_FILE,
    checkpoint_run,
    checkpoints,
    differing,
    flat_config,
    latest_checkpoint,
    preflight,
    run_config,
    run_identity,
    validate_config,
)
from lorakit.training.runtime import build_optimizer, make_accelerator, mixed_precision  # noqa: F401 - re-exported


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


# ------------------------------------------------------------------------------------------------ the loop


class TrainLoop(Checkpointing):
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
        cfg, acc = self.cfg, self.accelerator
        if cfg.gradient_checkpointing:
            for m in self.raw_models:
                fn = getattr(m, "enable_gradient_checkpointing", None) or getattr(m, "gradient_checkpointing_enable", None)
                if fn is None:
                    note(f"lorakit: {type(m).__name__} has no gradient checkpointing; running without it")
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
            KeyedDataset(self.dataset), batch_sampler=sampler, collate_fn=self.collate_fn,
            num_workers=self.cfg.dataloader_num_workers, persistent_workers=False,
            # its own generator: creating the iterator draws a base seed, which must not move the global RNG
            # (restored by load_state on resume) — else LoRA dropout masks differ after a resume
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )
        return iter(loader)

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
        try:
            tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
            tracker.add_image("samples", np.asarray(grid), self.global_step, dataformats="HWC")
        except Exception as err:  # noqa: BLE001 - a logging failure must not stop training
            warn(f"could not log the sample grid to tensorboard: {err}")

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
        acc, cfg = self.accelerator, self.cfg
        data = self._start()
        losses: list[float] = []
        samples: list[Path] = []
        step_seconds: list[float] = []
        start_step = self.global_step
        bar = tqdm(total=cfg.max_steps, initial=self.global_step, desc="train", unit="step",
                   disable=not acc.is_local_main_process, dynamic_ncols=True)
        end = min(cfg.max_steps, cfg.stop_at_step) if cfg.stop_at_step > 0 else cfg.max_steps
        while self.global_step < end:
            t_step = time.perf_counter()
            step_loss = self._optimizer_step(data)
            self.global_step += 1
            step_seconds.append(time.perf_counter() - t_step)  # .item() in the step synchronised the device
            losses.append(step_loss)
            lr = self.lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            if cfg.logging == "tensorboard" and self.global_step % max(1, cfg.log_every) == 0:
                acc.log({"loss": step_loss, "lr": lr}, step=self.global_step)
            sample = self._periodic(last=self.global_step == end)
            if sample:
                samples.append(sample)
        bar.close()
        final = self._finish(start_step)
        result = TrainResult(final, self.global_step, losses, self.last_checkpoint, time.perf_counter() - t0, samples,
                             step_seconds)
        self._summary(result, start_step)
        return result

    def _start(self):
        """Prepare the models, resume, start the trackers; returns the data iterator at the restored position."""
        acc, cfg = self.accelerator, self.cfg
        self._prepare()
        self._resume()
        if cfg.logging == "tensorboard":
            acc.init_trackers("lorakit", config=flat_config(cfg))
        accum = cfg.gradient_accumulation_steps
        data = self._loader(self.global_step * accum)
        acc.step = self.global_step * accum  # accelerate's accumulation counter, aligned with the restored step
        for m in self.models:
            m.train()
        self._params = self._trainable_params()
        return data

    def _optimizer_step(self, data) -> float:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns its mean loss over
        every process (a non-finite one stops the run)."""
        acc, cfg = self.accelerator, self.cfg
        micro_losses = []
        for _ in range(cfg.gradient_accumulation_steps):
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
                        acc.clip_grad_norm_(self._params, cfg.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
        return step_loss

    def _periodic(self, last: bool) -> Path | None:
        """Artifacts, checkpoints and samples due after this step; returns the sample grid written, if any."""
        cfg, step = self.cfg, self.global_step
        if cfg.save_every and step % cfg.save_every == 0 and not last:
            self._save_artifact(step)
        if cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0 and not last:
            self._checkpoint()
        if cfg.sample_every and (step % cfg.sample_every == 0 or last):
            return self._sample()
        return None

    def _finish(self, start_step: int) -> Path | None:
        """The final artifact (or the step's, when the run stops early) and the closing checkpoint."""
        cfg = self.cfg
        final = self._save_artifact(None if self.global_step >= cfg.max_steps else self.global_step)
        at_end = cfg.checkpoint_at_end
        if at_end is None:  # checkpointing_steps: 0 means no checkpoint, unless the run stops early to resume
            at_end = cfg.checkpointing_steps > 0 or self.global_step < cfg.max_steps
        if at_end and self.global_step > start_step:
            self._checkpoint()
        if cfg.logging == "tensorboard":
            self.accelerator.end_training()
        return final

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
