"""Memory pre-flight: estimate what a stage needs before loading anything, and refuse when it cannot fit.

The estimate is built from the base model's configs, never its weights: the models are built on PyTorch's
``meta`` device (shapes only, no memory, well under a second even for SDXL), and one step of the stage is run
there under a dispatch mode that adds up the bytes of every tensor alive at each moment (:class:`LiveBytes`).
So activations, gradients and the transient buffers of forward and backward are counted from the real
diffusers / peft code, at the batch, resolution, rank and dtype of the run. Scaled-dot-product attention is
counted as a fused kernel (output + log-sum-exp), which is what PyTorch runs on CPU and CUDA.

Parts of an :class:`Estimate` (bytes):
  * ``weights``: every model of the pipeline in the run's dtype, plus the adapters loaded on top;
  * ``optimizer``: AdamW's two fp32 states per trainable parameter;
  * ``step``: the traced peak of one step (activations, gradients, temporaries);
  * ``cache``: CMLoRA's per-LoRA deep features;
  * ``gram`` / ``copies`` / ``solve`` / ``capture``: gradient fusion's float64 Gram matrices of its largest stage
    (fit and, with ``--ridge auto``, held-out), its two copies of the adapted layers' weights (the base weights
    and the UNet stage's saved weights), the widest layer's float64 solve, and the widest conv's unfolded inputs
    while capturing (:func:`lorakit.fusion.gradient_memory.fusion_layers` reads the layers from the adapter files when they are given);
  * ``runtime``: the process itself (Python, torch, diffusers; ~0.6 GiB RSS on the CPU, 0 on CUDA where the
    check uses the free memory the driver reports).

:func:`preflight` compares the total with the free memory of the device and raises :class:`InsufficientMemory`
(one line: stage, estimate by part, what is free, the override) when it does not fit. tests/test_memory.py
checks the estimate against the measured peak RSS of real steps on tiny and mid models.
"""

from __future__ import annotations

import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lorakit.blocks import lora_able_modules, lora_config, module_ranks, resolve_block_spec
from lorakit.errors import InsufficientMemory  # noqa: F401 - raised here, caught by the CLI and the trainers
from lorakit.fusion import gradient_memory
from lorakit.models import component_factories, detect_arch, parse_random_spec

GIB = 2**30
CPU_RUNTIME_BYTES = int(0.6 * GIB)  # RSS of a process that imported torch + diffusers + transformers + peft
STAGES = ("train", "edlora", "lorarar", "ziplora", "fuse-gradient", "sample")


@dataclass
class Estimate:
    """Bytes a stage needs, by part (see the module docstring)."""

    stage: str
    device: str
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items() if v)
        return f"{self.stage} needs ~{self.total / GIB:.1f} GiB on {self.device} ({parts} GiB)"


class _FusedAttention(torch.autograd.Function):
    """Stand-in for scaled_dot_product_attention on meta tensors with a fused kernel's memory: out + lse."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created while active (meta or real tensors), freed when their storage dies.

    Storages that existed before (the weights) are never counted, nor are views of them.
    """

    def __init__(self, existing=()):
        super().__init__()
        self.live = self.peak = 0
        self._ids = {id(t.untyped_storage()) for t in existing}
        self._orig_sdpa = None

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self._ids.discard(key)

    def __enter__(self):
        self._orig_sdpa = F.scaled_dot_product_attention

        def sdpa(q, k, v, *args, **kwargs):
            if q.device.type == "meta":  # the math fallback would materialise [L, L] scores
                return _FusedAttention.apply(q, k, v)
            return self._orig_sdpa(q, k, v, *args, **kwargs)

        F.scaled_dot_product_attention = sdpa
        return super().__enter__()

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self._orig_sdpa
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._ids:
                    n = storage.nbytes()
                    self._ids.add(key)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, n)
        return out


# ---------------------------------------------------------------------------------------------------------------
# The base's models on the meta device


def _guess_single_file_arch(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sdxl"
    return "sd2" if any(k.startswith("cond_stage_model.model.") for k in keys) else "sd1"


def meta_models(base) -> tuple[str, dict[str, torch.nn.Module]] | None:
    """``(arch, {component: meta module})`` for a base, or None where the configs cannot be read offline (hub id).

    ``base``: a loaded pipeline, ``tiny:ARCH[:SEED]``, ``random:ARCH:SIZE[:SEED]``, a diffusers folder, or a
    single-file ``.safetensors`` (its architecture from the key names, sizes of the released models).
    """
    with torch.device("meta"):
        if hasattr(base, "unet"):
            from diffusers import AutoencoderKL, UNet2DConditionModel

            models = {"unet": UNet2DConditionModel.from_config(base.unet.config),
                      "vae": AutoencoderKL.from_config(base.vae.config)}
            for comp in ("text_encoder", "text_encoder_2"):
                te = getattr(base, comp, None)
                if te is not None:
                    models[comp] = type(te)(te.config)
            return detect_arch(base.unet.config), models
        src = str(base)
        if src.startswith("tiny:"):
            arch = src[5:].partition(":")[0]
            return arch, {k: f() for k, f in component_factories(arch, "tiny").items()}
        if src.startswith("random:"):
            arch, size, _ = parse_random_spec(src)
            return arch, {k: f() for k, f in component_factories(arch, size).items()}
        path = Path(src)
        if path.is_dir() and (path / "unet" / "config.json").is_file():
            from diffusers import AutoencoderKL, UNet2DConditionModel
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            unet = UNet2DConditionModel.from_config(json.loads((path / "unet" / "config.json").read_text()))
            models = {"unet": unet, "vae": AutoencoderKL.from_config(json.loads((path / "vae" / "config.json").read_text()))}
            for comp, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
                cfg = path / comp / "config.json"
                if cfg.is_file():
                    models[comp] = cls(CLIPTextConfig.from_json_file(cfg))
            return detect_arch(unet.config), models
        if path.suffix == ".safetensors" and path.is_file():
            arch = _guess_single_file_arch(path)
            return arch, {k: f() for k, f in component_factories(arch, "full").items()}
    return None


def _nbytes(module: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    size = torch.finfo(dtype).bits // 8 if dtype is not None else None
    return sum(p.numel() * (size or p.element_size()) for p in module.parameters())


def _add_lora(unet, arch: str, rank: int, conv: bool) -> int:
    """Add a peft LoRA (all blocks) to a meta UNet as the trainers do; returns its parameter count."""
    from peft import inject_adapter_in_model

    ranks = module_ranks(lora_able_modules(unet), resolve_block_spec("all", arch, rank), "locon" if conv else "lora",
                         rank=rank, alpha=rank, conv_rank=rank if conv else None, conv_alpha=rank if conv else None)
    inject_adapter_in_model(lora_config(ranks), unet, adapter_name="default")
    n = 0
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)
        n += p.numel() if p.requires_grad else 0
    return n


def _unet_inputs(unet, arch: str, batch: int, latent: int, dtype: torch.dtype) -> tuple[tuple, dict]:
    cfg = unet.config
    dev = torch.device("meta")
    x = torch.empty(batch, cfg.in_channels, latent, latent, device=dev, dtype=dtype)
    ehs = torch.empty(batch, 77, cfg.cross_attention_dim, device=dev, dtype=dtype)
    t = torch.empty(batch, device=dev, dtype=torch.long)
    kwargs = {}
    if arch == "sdxl":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, pooled, device=dev, dtype=dtype),
                                       "time_ids": torch.empty(batch, 6, device=dev, dtype=dtype)}
    return (x, t, ehs), kwargs


def trace_peak(fn, existing=()) -> int:
    """Peak bytes of the tensors ``fn()`` creates (run it on meta modules to spend no memory)."""
    with LiveBytes(existing) as live:
        fn()
    return live.peak


def unet_step_peak(unet, arch: str, batch: int, latent: int, dtype: torch.dtype, train: bool,
                   gradient_checkpointing: bool = False) -> int:
    """Traced peak bytes of one UNet forward (``train``: + MSE loss + backward into the trainable parameters)."""
    args, kwargs = _unet_inputs(unet, arch, batch, latent, dtype)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train(train)

    def step():
        with torch.set_grad_enabled(train):
            out = unet(*args, **kwargs).sample
            if train:
                out.float().pow(2).mean().backward()

    try:
        return trace_peak(step, existing=list(unet.parameters()) + list(unet.buffers()))
    finally:
        for p in unet.parameters():
            p.grad = None
        if gradient_checkpointing:
            unet.disable_gradient_checkpointing()


def vae_peak(vae, pixels: int, dtype: torch.dtype, decode: bool) -> int:
    """Traced peak bytes of one VAE encode (``decode=False``) or decode of a ``pixels``-square image, no grad."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    dev = torch.device("meta")

    def run():
        with torch.no_grad():
            if decode:
                vae.decode(torch.empty(1, vae.config.latent_channels, pixels // factor, pixels // factor, device=dev,
                                       dtype=dtype))
            else:
                vae.encode(torch.empty(1, 3, pixels, pixels, device=dev, dtype=dtype))

    return trace_peak(run, existing=list(vae.parameters()) + list(vae.buffers()))


# ---------------------------------------------------------------------------------------------------------------
# Stages


def estimate(stage: str, base, *, resolution: int | None = None, batch: int = 1, rank: int = 4, n_loras: int = 1,
             dtype: torch.dtype = torch.float32, device: str = "cpu", gradient_checkpointing: bool = False,
             conv: bool = False, cfg: bool = True, method: str = "merge", max_conv_dim: int = 4608,
             adapter_bytes: int | None = None, heldout: bool = True,
             layers: list | None = None) -> Estimate | None:
    """What ``stage`` needs on ``device``, from the base's configs. None when the base's configs are not at hand.

    Args:
        stage: ``train`` (block-wise LoRA/LoCon), ``edlora``, ``lorarar``, ``ziplora``, ``fuse-gradient``, ``sample``.
        base: anything :func:`meta_models` takes.
        resolution: image size in pixels (square; default the base's native size); ``batch``: images per step
            (sampling: per UNet batch).
        rank: LoRA rank (each of the ``n_loras`` adapters). ``conv``: LoCon (LoRA on convolutions too).
        dtype: the weights' dtype in the run (training under mixed precision: the compute dtype).
        cfg: sampling with classifier-free guidance (UNet batch doubled). ``method``: sampling method (cmlora caches
            one deep feature per LoRA; composite / switch / cmlora keep every adapter loaded, merge too).
        adapter_bytes: the adapters' total size when known (their files); default ``n_loras`` rank-``rank`` LoRAs
            on every LoRA-able UNet module.
        heldout: ``fuse-gradient`` with ``--ridge auto``: held-out Gram matrices beside the fit ones.
        layers: ``fuse-gradient``: the layers the adapters adapt (``lorakit.fusion.gradient_memory.fusion_layers`` of their files); default
            every LoRA-able UNet module (``conv``: every conv too) with ``n_loras`` rank-``rank`` LoRAs.
        For ``fuse-gradient``, ``batch`` is the capture batch (prompts x seeds per forward pass).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    found = meta_models(base)
    if found is None:
        return None
    arch, models = found
    unet, vae = models["unet"], models["vae"]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = resolution or unet.config.sample_size * factor
    latent = resolution // factor
    for m in models.values():  # the run's dtype (assigning meta tensors: no copy, no diffusers warning)
        for p in list(m.parameters()) + list(m.buffers()):
            if p.is_floating_point():
                p.data = torch.empty(p.shape, device="meta", dtype=dtype)
    est = Estimate(stage, device, {"runtime": CPU_RUNTIME_BYTES if device == "cpu" else 0})
    est.parts["weights"] = sum(_nbytes(m) for m in models.values())
    if stage in ("train", "edlora", "lorarar", "ziplora"):
        _training_parts(est, stage, arch, unet, vae, resolution, latent, batch=batch, rank=rank, conv=conv,
                        dtype=dtype, gradient_checkpointing=gradient_checkpointing)
    elif stage in ("sample", "fuse-gradient"):
        lora = _add_lora(unet, arch, rank, conv) * torch.finfo(dtype).bits // 8
        est.parts["weights"] += adapter_bytes if adapter_bytes is not None else lora * n_loras
        unet_batch = batch * (2 if cfg else 1)
        step = unet_step_peak(unet, arch, unet_batch, latent, dtype, train=False)
        est.parts["step"] = max(step, vae_peak(vae, resolution, dtype, decode=True))
        if stage == "sample" and method == "cmlora":
            channels = unet.config.block_out_channels[1]
            est.parts["cache"] = n_loras * unet_batch * channels * latent * latent * torch.finfo(dtype).bits // 8
        if stage == "fuse-gradient":
            if layers is None:
                layers = gradient_memory.meta_fusion_layers(unet, rank * n_loras)
            gradient_memory.add_gradient_fusion_parts(est.parts, layers, max_conv_dim, dtype, heldout,
                                                      rows=unet_batch * latent * latent)
    return est


def _training_parts(est: Estimate, stage: str, arch, unet, vae, resolution: int, latent: int, *, batch: int,
                    rank: int, conv: bool, dtype, gradient_checkpointing: bool) -> None:
    adapters = 2 if stage in ("lorarar", "ziplora") else 1
    trainable = _add_lora(unet, arch, rank * adapters, conv)
    est.parts["weights"] += trainable * 4 - trainable * torch.finfo(dtype).bits // 8  # trainable stays fp32
    for name, p in unet.named_parameters():
        if "lora_" in name:
            p.data = torch.empty(p.shape, device="meta", dtype=torch.float32)
    if stage in ("train", "edlora"):
        est.parts["optimizer"] = 2 * 4 * trainable
    if stage == "ziplora":  # one pass over both halves, content and style (ZipLoRALoss); no full-size weight
        batch *= 2
    step = unet_step_peak(unet, arch, batch, latent, dtype, train=True,
                          gradient_checkpointing=gradient_checkpointing)
    est.parts["step"] = max(step, vae_peak(vae, resolution, dtype, decode=False))


def available_bytes(device: str = "cpu") -> int:
    """Free memory now: the driver's free VRAM on CUDA, the OS's available RAM (and cgroup limit) on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    import psutil

    free = psutil.virtual_memory().available
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max":
                free = min(free, int(limit) - int(Path(usage_file).read_text()))
        except (OSError, ValueError):
            pass
    return free


def default_device() -> str:
    """Where a stage will run: ``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


SMALL_BASE_BYTES = 100 * 2**20  # below this a base fits anywhere lorakit runs; its trace would cost seconds


def worth_checking(base) -> bool:
    """False for an already loaded pipeline (its memory is spent), ``tiny:`` bases and a base folder whose weight
    files total under ``SMALL_BASE_BYTES`` (the toy bases, a few MB: a trace costs seconds per run)."""
    if hasattr(base, "unet") or str(base).startswith("tiny:"):
        return False
    folder = Path(str(base))
    if folder.is_dir():
        weights = [p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt")]
        return not weights or sum(p.stat().st_size for p in weights) >= SMALL_BASE_BYTES
    return True


def check_training(stage: str, cfg, base, dtype: torch.dtype, rank: int, conv: bool = False) -> None:
    """Pre-flight of a trainer (``cfg``: its config). Skipped when ``cfg.memory_check`` is false, for an already
    loaded pipeline (its memory is spent) and for ``tiny:`` bases (a few MB; the trace would cost seconds)."""
    if not getattr(cfg, "memory_check", True) or not worth_checking(base):
        return
    resolution = getattr(cfg.data, "resolution", None) if hasattr(cfg, "data") else None
    if stage in ("lorarar", "ziplora"):
        resolution = getattr(cfg, "reference_size", 0) or None
    batch = getattr(cfg, "ref_batch_size", None) if stage == "lorarar" else cfg.train_batch_size
    est = estimate(stage, base, resolution=resolution, batch=batch or 1, rank=rank, dtype=dtype,
                   device=default_device(), gradient_checkpointing=cfg.gradient_checkpointing, conv=conv)
    preflight(est, "memory_check=false")


def preflight(est: Estimate | None, override_hint: str, free: int | None = None) -> None:
    """Raise :class:`InsufficientMemory` when ``est`` does not fit in the free memory of its device.

    ``override_hint``: how the user skips the check (``memory_check=false``, ``--no-memory-check``). A None
    estimate (configs not at hand) passes. ``LORAKIT_NO_MEMORY_CHECK=1`` skips every check.
    """
    if est is None or os.environ.get("LORAKIT_NO_MEMORY_CHECK") == "1":
        return
    free = available_bytes(est.device) if free is None else free
    if est.total > free:
        raise InsufficientMemory(f"not enough memory: {est.describe()}, {free / GIB:.1f} GiB free; lower the "
                                 f"resolution / batch / rank or use bf16, or skip this check with {override_hint}")
