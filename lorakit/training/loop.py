"""The shared Accelerate training loop used by every lorakit trainer (block-wise LoRA, ED-LoRA, LoRA.rar, toy base).

A trainer builds its models, says which parameters train, and hands the loop three callables; the loop does the
rest: ``accelerator.prepare``, gradient accumulation, clipping, the diffusers LR scheduler with warmup, NaN
detection, ``save_state``/``load_state`` checkpoints with exact resume (``resume: latest``), periodic artifacts
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
  * Checkpoints: ``<output_dir>/checkpoints/checkpoint-<step>/`` via ``accelerator.save_state`` (trainable
    parameters only, optimizer, LR scheduler, grad scaler, RNG states) every ``checkpointing_steps`` and at the
    end. ``resume: latest`` (or a checkpoint path) continues bit-exactly: the data order is a pure function of
    (seed, position), and the position is restored.
  * A non-finite loss raises :class:`TrainingDiverged` naming the step and the last good checkpoint.
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

from lorakit.data import DataConfig

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LOOP_STATE_FILE = "lorakit_loop.json"


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass
class TrainConfig:
    """Keys every lorakit training recipe accepts (YAML or ``key=value`` overrides).

    Trainers subclass this dataclass and add their own keys (``network``, ...).
    """

    base_model: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    output_dir: str = "output"
    output_name: str = "lora"
    max_steps: int = 1000
    seed: int = 0
    train_batch_size: int = 1  # per process
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    text_encoder_lr: float | None = None  # default: learning_rate
    optimizer: str = "adamw"  # adamw | adamw8bit
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "constant"  # any diffusers scheduler name: constant, constant_with_warmup, linear, cosine, ...
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    max_grad_norm: float = 1.0  # 0 = no clipping
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    checkpointing_steps: int = 500  # 0 = only at the end
    checkpoint_at_end: bool = True
    checkpoints_total_limit: int | None = 3
    resume: str | None = None  # latest | <path to checkpoint-N>
    stop_at_step: int = 0  # >0: end this run early at that step (checkpoint + step artifact), resume later
    save_every: int = 0  # 0 = only the final artifact
    sample_every: int = 0  # 0 = never
    sample_prompts: list[str] = field(default_factory=list)
    sample_num_inference_steps: int = 25
    sample_guidance_scale: float = 7.0
    sample_seed: int = 0
    logging: str = "tensorboard"  # tensorboard | none
    log_every: int = 1
    dataloader_num_workers: int = 0
    memory_check: bool = True  # refuse to start when lorakit.memory's estimate exceeds the free RAM / VRAM


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
    value = str(cfg.mixed_precision).strip().lower()
    value = "no" if value in ("no", "false", "none", "fp32", "") else value
    if value not in ("no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision={cfg.mixed_precision!r}: expected 'no', 'fp16' or 'bf16'")
    return value


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


def _mix(*parts: int) -> int:
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_generator(seed: int, sample_id: int, salt: int = 0) -> torch.Generator:
    """A CPU generator for one sample's random draws, seeded by (seed, sample id, salt)."""
    return torch.Generator().manual_seed(_mix(seed, sample_id, salt))


def randn_per_sample(shape, sample_ids, seed: int, salt: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normal noise ``[b, *shape]``, row ``k`` drawn from ``sample_generator(seed, sample_ids[k], salt)``.

    The draws are made on the CPU, so they are equal on every device and for any process layout.
    """
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
        gen = torch.Generator().manual_seed(_mix(self.seed, epoch, 7))
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
        self.last_checkpoint: Path | None = None
        self._loss_takes_models = len(inspect.signature(compute_loss).parameters) >= 3
        if cfg.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {cfg.max_steps}")

    # -- checkpoint hooks: store only trainable parameters (a LoRA checkpoint is MBs, not GBs)
    def _save_hook(self, models, weights, output_dir):
        for i, model in enumerate(models):
            keep = {n for n, p in model.named_parameters() if p.requires_grad}
            weights[i] = {k: v for k, v in weights[i].items() if k in keep}

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
        acc.register_for_checkpointing(self.lr_scheduler)
        acc.register_save_state_pre_hook(self._save_hook)

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

    # -- checkpoints
    def _resume(self) -> None:
        cfg = self.cfg
        if not cfg.resume:
            return
        path = latest_checkpoint(cfg.output_dir) if str(cfg.resume) == "latest" else Path(cfg.resume)
        if path is None:
            self.accelerator.print(f"lorakit: resume=latest but {self.output_dir / 'checkpoints'} has no checkpoint; starting at step 0")
            return
        state_file = path / LOOP_STATE_FILE
        if not state_file.exists():
            raise FileNotFoundError(f"resume={cfg.resume!r}: {path} is not a lorakit checkpoint (no {LOOP_STATE_FILE})")
        state = json.loads(state_file.read_text())
        if state.get("train_batch_size_global") not in (None, cfg.train_batch_size * self.accelerator.num_processes):
            self.accelerator.print(
                f"lorakit: warning: checkpoint was made with global batch {state['train_batch_size_global']}, "
                f"now {cfg.train_batch_size * self.accelerator.num_processes}; the data order will differ"
            )
        self.accelerator.load_state(str(path), strict=False)
        self.global_step = int(state["global_step"])
        self.last_checkpoint = path
        self.accelerator.print(f"lorakit: resumed from {path} at step {self.global_step}")

    def _checkpoint(self) -> Path:
        acc, cfg = self.accelerator, self.cfg
        root = self.output_dir / "checkpoints"
        final = root / f"checkpoint-{self.global_step}"
        tmp = root / f".tmp-checkpoint-{self.global_step}"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            from lorakit.fileio import write_json

            write_json({"global_step": self.global_step,
                        "train_batch_size_global": cfg.train_batch_size * acc.num_processes}, tmp / LOOP_STATE_FILE)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            limit = cfg.checkpoints_total_limit
            if limit:
                found = sorted((int(m.group(1)), p) for p in root.iterdir() for m in [CHECKPOINT_RE.match(p.name)] if m)
                for _, old in found[:-limit]:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        self.last_checkpoint = final
        return final

    # -- artifacts and samples (main process)
    def artifact_path(self, step: int | None = None) -> Path:
        """``<output_dir>/<output_name>[-stepNNNNNN]<suffix>``."""
        tag = "" if step is None else f"-step{step:06d}"
        return self.output_dir / f"{self.cfg.output_name}{tag}{self.artifact_suffix}"

    def _save_artifact(self, step: int | None) -> Path | None:
        acc = self.accelerator
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
        from accelerate.utils import send_to_device
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.cfg
        t0 = time.perf_counter()
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
                            self._diverged(step_loss)
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
        if cfg.checkpoint_at_end and self.global_step > start_step:
            self._checkpoint()
        if cfg.logging == "tensorboard":
            acc.end_training()
        result = TrainResult(final, self.global_step, losses, self.last_checkpoint, time.perf_counter() - t0, samples,
                             step_seconds)
        self._summary(result, start_step)
        return result

    def _diverged(self, value: float):
        where = self.last_checkpoint or "none (set checkpointing_steps to keep some)"
        raise TrainingDiverged(
            f"loss is {value} at step {self.global_step + 1}: training stopped. Last good checkpoint: {where}. "
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
