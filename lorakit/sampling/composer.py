"""Multi-LoRA composition at sampling time: merge, LoRA Switch, LoRA Composite and CMLoRA.

* ``merge``: every adapter active at once (diffusers ``set_adapters(names, weights)``), one diffusers pipeline call.
* ``switch``: one adapter active per step, rotating every ``switch_every`` steps in the given order (first adapter
  first); the rotation is a ``callback_on_step_end`` of the diffusers pipeline. Text features come from the first
  adapter (the pipeline encodes the prompt once, before step 0).
* ``composite``: a denoising loop over the pipeline's UNet / scheduler / VAE; at every step each adapter i gives its
  own CFG pair (uncond and cond, text encoded with adapter i too); ``eps = mean_i eps_i``.
* ``cmlora``: the same loop with per-step weights: the dominant adapter gets ``dominant_weight`` of the total and
  the others share the rest; dominance rotates through the frequency order (:mod:`lorakit.sampling.frequency`) on
  a non-uniform schedule (:func:`dominance_schedule`, denser switching early and late); with caching on, each
  adapter runs full UNet passes only on the refresh plan of :func:`lorakit.sampling.cache.cache_plan` and shallow
  passes on its own cached deep feature otherwise. ``cache=False`` runs the same schedule with full passes.

Where we differ from the reference code (METHODS.md section 3): caches are refreshed on schedule until the last
step for every adapter (the reference stops refreshing after step 120 and never refreshes the background LoRA);
frequency scores are measured, never looked up from a category table.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorakit.sampling.cache import DeepFeatureCache, cache_plan

METHODS = ("merge", "switch", "composite", "cmlora")


@dataclass
class SamplerSettings:
    """Settings of one sampling run (all go into each image's JSON sidecar)."""

    method: str = "merge"
    steps: int = 30
    cfg: float = 7.5
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    switch_every: int = 5  # switch: tau; cmlora: mean segment length of the dominance schedule
    dominant_weight: float = 0.55  # cmlora: share of the total weight the dominant adapter gets
    schedule_warp: float = 0.75  # cmlora: 0 = uniform segments, -> 1 = much denser switching early and late
    order: str = "high-first"  # cmlora: high-first | low-first | given
    cache: bool = True  # cmlora: per-adapter deep-feature caching
    cache_depth: int = 1  # cmlora: split depth (1 = first down block + last up block are the shallow path)
    cache_interval: int = 5  # cmlora: maximum age of an adapter's cached deep feature, in steps

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.switch_every < 1:
            raise ValueError(f"switch_every must be >= 1, got {self.switch_every}")
        if not 0.0 < self.dominant_weight <= 1.0:
            raise ValueError(f"dominant_weight must be in (0, 1], got {self.dominant_weight}")
        if not 0.0 <= self.schedule_warp < 1.0:
            raise ValueError(f"schedule_warp must be in [0, 1), got {self.schedule_warp}")
        if self.order not in ("high-first", "low-first", "given"):
            raise ValueError(f"order must be high-first, low-first or given, got {self.order!r}")
        if self.cache_interval < 1:
            raise ValueError(f"cache_interval must be >= 1, got {self.cache_interval}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (v <= 0 or v % 8):
                raise ValueError(f"{name} must be a positive multiple of 8, got {v}")


@dataclass
class LoadedAdapter:
    """An adapter file loaded into a pipeline under ``name``."""

    name: str
    path: str
    sha256: str
    kind: str
    weight: float = 1.0
    metadata: dict = field(default_factory=dict, repr=False)

    def record(self) -> dict:
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "kind": self.kind, "weight": self.weight}


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable .safetensors adapter file: {err}") from err


def load_adapters(pipe, paths: list, weights: list[float] | None = None) -> list[LoadedAdapter]:
    """Load adapter files into ``pipe`` (diffusers ``load_lora_weights``), each under its own adapter name.

    Files whose metadata says ``lorakit.kind=edlora`` go through ``lorakit.adapters.edlora.load_edlora`` where
    that module exists; every other file is a plain LoRA/LoCon (kohya, lorakit or diffusers layout).

    Args:
        paths: adapter ``.safetensors`` files.
        weights: LoRA scale per adapter (default 1.0 each).
    Raises:
        FileNotFoundError, ValueError (via ``AdapterError``) naming the file that does not fit the base.
    """
    import importlib.util

    from lorakit.adapters.io import load_adapter, validate_adapter

    weights = [1.0] * len(paths) if weights is None else list(weights)
    if len(weights) != len(paths):
        raise ValueError(f"got {len(weights)} weights for {len(paths)} adapters")
    loaded = []
    for i, (path, weight) in enumerate(zip(paths, weights)):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"adapter file not found: {path}")
        meta = _read_metadata(path)
        name = f"a{i}_" + re.sub(r"[^A-Za-z0-9_]", "_", path.stem)[:40]
        kind = meta.get("lorakit.kind", "lora")
        if kind == "edlora" and importlib.util.find_spec("lorakit.adapters.edlora") is not None:
            from lorakit.adapters.edlora import load_edlora

            load_edlora(pipe, path, adapter_name=name)
        else:
            validate_adapter(load_adapter(path), pipe, path)
            pipe.load_lora_weights(str(path), adapter_name=name)
        loaded.append(LoadedAdapter(name, str(path.resolve()), file_sha256(path), kind, float(weight), meta))
    return loaded


class UNetAdapterSwitch:
    """Activate adapters on the UNet's peft layers quickly (the per-module part of diffusers' ``set_adapters``).

    diffusers' ``set_adapters`` walks every module of every component; the composite loops switch the UNet's adapter
    once per UNet pass, so the peft layers are collected once here.
    """

    def __init__(self, unet):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        self.active: tuple | None = None

    def activate(self, names: list[str], weights: list[float]) -> None:
        key = (tuple(names), tuple(weights))
        if key == self.active:
            return
        for layer in self.layers:
            layer.set_adapter(list(names))
            for n, w in zip(names, weights):
                layer.set_scale(n, w)
        self.active = key


def dominance_schedule(steps: int, order: list[int], switch_every: int = 5, warp: float = 0.75) -> list[int]:
    """The dominant adapter (index) per step: segments rotate through ``order``; segments are shorter early and late.

    Segment boundaries are ``round(steps * g(k / K))`` for ``K = max(len(order), ceil(steps / switch_every))``
    segments, with ``g(u) = u - warp * sin(2 pi u) / (2 pi)``: the slope ``1 - warp cos(2 pi u)`` is smallest at
    both ends (dense switching) and largest mid-way. ``warp=0`` gives uniform segments.

    Returns:
        ``[steps]`` list of adapter indices.
    """
    if not order:
        raise ValueError("dominance schedule needs at least one adapter")
    k_total = min(steps, max(len(order), math.ceil(steps / switch_every)))
    bounds = sorted({round(steps * (u - warp * math.sin(2 * math.pi * u) / (2 * math.pi))) for u in (k / k_total for k in range(k_total + 1))})
    bounds[0], bounds[-1] = 0, steps
    dominants = []
    for k, (start, end) in enumerate(zip(bounds, bounds[1:])):
        dominants += [order[k % len(order)]] * (end - start)
    return dominants


def step_weights(dominant: int, n: int, dominant_weight: float) -> list[float]:
    """Per-adapter noise weights of one CMLoRA step: the dominant one ``dominant_weight``, the rest share the rest."""
    if n == 1:
        return [1.0]
    rest = (1.0 - dominant_weight) / (n - 1)
    return [dominant_weight if i == dominant else rest for i in range(n)]


def _is_xl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None or "XL" in type(pipe).__name__


def encode(pipe, prompt: str, negative_prompt: str | None, batch: int, do_cfg: bool) -> dict:
    """Text features of one prompt for a batch, via ``pipe.encode_prompt`` with the currently active adapters.

    Returns:
        ``{'embeds': [2B or B, L, D]}`` (negative rows first under CFG) plus, for SDXL, ``'pooled'`` ``[2B or B, P]``.
    """
    device = pipe._execution_device
    neg = negative_prompt or None
    if _is_xl(pipe):
        pos, negs, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=batch, do_classifier_free_guidance=do_cfg, negative_prompt=neg
        )
        if do_cfg:
            return {"embeds": torch.cat([negs, pos]), "pooled": torch.cat([neg_pooled, pooled]), "pos": pos, "neg": negs,
                    "pos_pooled": pooled, "neg_pooled": neg_pooled}
        return {"embeds": pos, "pooled": pooled, "pos": pos, "pos_pooled": pooled}
    pos, negs = pipe.encode_prompt(prompt, device, batch, do_cfg, neg)
    if do_cfg:
        return {"embeds": torch.cat([negs, pos]), "pos": pos, "neg": negs}
    return {"embeds": pos, "pos": pos}


def _time_ids(pipe, height: int, width: int, rows: int, dtype) -> torch.Tensor:
    ids = pipe._get_add_time_ids(
        (height, width), (0, 0), (height, width), dtype=dtype, text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim
    )
    return ids.to(pipe._execution_device).repeat(rows, 1)


def set_scheduler(pipe, name: str | None) -> None:
    """Replace the pipeline's scheduler by a named one (``lorakit.models.sd_scheduler`` names), keeping its config."""
    if not name:
        return
    from lorakit.models import sd_scheduler

    template = sd_scheduler(name)
    extra = {k: True for k in ("use_karras_sigmas",) if template.config.get(k)}
    pipe.scheduler = type(template).from_config(pipe.scheduler.config, **extra)


def image_size(pipe, settings: SamplerSettings) -> tuple[int, int]:
    """(height, width) in pixels: the settings' or the UNet's default."""
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return settings.height or default, settings.width or default


@torch.no_grad()
def generate(
    pipe,
    adapters: list[LoadedAdapter],
    settings: SamplerSettings,
    prompt: str,
    negative_prompt: str | None,
    seeds: list[int],
    regions=None,
    order: list[int] | None = None,
):
    """Generate one image per seed for one prompt with a composition method.

    Args:
        pipe: a diffusers SD/SDXL pipeline with ``adapters`` loaded (:func:`load_adapters`).
        settings: method and sampler settings.
        seeds: one seed per image; image i's initial noise (and any scheduler noise) comes from ``seeds[i]``.
        regions: optional :class:`lorakit.sampling.regional.RegionSpec`; its global prompt replaces ``prompt``.
        order: cmlora only: adapter indices in dominance order (default: the given order).
    Returns:
        ``(images, info)``: PIL images ``[len(seeds)]`` and a dict with the method's schedule (switch order,
        dominants per step, pass counts).
    """
    settings.check()
    if not adapters:
        raise ValueError("no adapters given: pass at least one adapter file")
    set_scheduler(pipe, settings.scheduler)
    height, width = image_size(pipe, settings)
    batch = len(seeds)
    device = pipe._execution_device
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    do_cfg = settings.cfg > 1.0 and pipe.unet.config.time_cond_proj_dim is None
    names = [a.name for a in adapters]
    scales = [a.weight for a in adapters]
    if regions is not None:
        prompt, negative_prompt = regions.prompt, regions.negative_prompt
    info: dict = {"method": settings.method, "height": height, "width": width}

    controller = previous = None
    if regions is not None and regions.regions:
        from lorakit.sampling.regional import RegionalController, install_regional

        controller = RegionalController([r.box for r in regions.regions], aspect=width / height)
        previous = install_regional(pipe.unet, controller)

    def contexts_for(active: list[int]) -> dict:
        """Text features (global + regions) with adapters ``active`` on, all components (diffusers set_adapters)."""
        pipe.set_adapters([names[i] for i in active], [scales[i] for i in active])
        ctx = encode(pipe, prompt, negative_prompt, batch, do_cfg)
        if controller is not None:
            ctx["regions"] = [
                encode(pipe, r.prompt, r.negative_prompt if r.negative_prompt is not None else negative_prompt, batch, do_cfg)["embeds"]
                for r in regions.regions
            ]
        return ctx

    try:
        if settings.method in ("merge", "switch"):
            images = _pipeline_call(pipe, settings, names, scales, contexts_for, controller, generators, height, width, do_cfg, info)
        else:
            images = _composite_loop(
                pipe, settings, names, scales, contexts_for, controller, generators, height, width, do_cfg, order, info
            )
    finally:
        if previous is not None:
            from lorakit.sampling.regional import remove_regional

            remove_regional(pipe.unet, previous)
    return images, info


def _pipeline_call(pipe, settings, names, scales, contexts_for, controller, generators, height, width, do_cfg, info):
    """merge / switch: one diffusers pipeline call (switch rotates adapters in ``callback_on_step_end``)."""
    n = len(names)
    if settings.method == "merge":
        ctx = contexts_for(list(range(n)))
        callback = None
    else:
        ctx = contexts_for([0])
        switch = UNetAdapterSwitch(pipe.unet)
        switch.activate([names[0]], [scales[0]])
        active = [0]

        def callback(p, i, t, kwargs):
            nxt = ((i + 1) // settings.switch_every) % n
            if i + 1 < settings.steps:
                switch.activate([names[nxt]], [scales[nxt]])
                active.append(nxt)
            return {}

        info["active_per_step"] = active
    if controller is not None:
        controller.set_states(ctx["regions"])
    kwargs = {}
    if _is_xl(pipe):
        kwargs["pooled_prompt_embeds"] = ctx["pos_pooled"]
        if do_cfg:
            kwargs["negative_pooled_prompt_embeds"] = ctx["neg_pooled"]
    if do_cfg:
        kwargs["negative_prompt_embeds"] = ctx["neg"]
    out = pipe(
        prompt_embeds=ctx["pos"],
        num_inference_steps=settings.steps,
        guidance_scale=settings.cfg,
        height=height,
        width=width,
        generator=generators,
        callback_on_step_end=callback,
        output_type="pil",
        **kwargs,
    )
    return out.images


def decode_latents(pipe, latents: torch.Tensor):
    """Latents ``[B, 4, h, w]`` -> PIL images, as the diffusers pipelines decode them."""
    vae = pipe.vae
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * image.shape[0])


def _composite_loop(pipe, settings, names, scales, contexts_for, controller, generators, height, width, do_cfg, order, info):
    """composite / cmlora: per step, each adapter's own CFG pair, weighted and summed, then one scheduler step."""
    n = len(names)
    batch = len(generators)
    unet, scheduler = pipe.unet, pipe.scheduler
    device = pipe._execution_device
    contexts = [contexts_for([i]) for i in range(n)]
    dtype = contexts[0]["embeds"].dtype
    added = [None] * n
    if _is_xl(pipe):
        ids = _time_ids(pipe, height, width, contexts[0]["embeds"].shape[0], dtype)
        added = [{"text_embeds": c["pooled"], "time_ids": ids} for c in contexts]
    latents = pipe.prepare_latents(batch, unet.config.in_channels, height, width, dtype, device, generators)
    extra = pipe.prepare_extra_step_kwargs(generators, 0.0)
    scheduler.set_timesteps(settings.steps, device=device)
    timesteps = scheduler.timesteps
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)

    if settings.method == "cmlora":
        order = list(range(n)) if order is None else list(order)
        if sorted(order) != list(range(n)):
            raise ValueError(f"cmlora order {order} must be a permutation of 0..{n - 1}")
        dominants = dominance_schedule(len(timesteps), order, settings.switch_every, settings.schedule_warp)
        plan = cache_plan(dominants, n, settings.cache_interval) if settings.cache else [[True] * n for _ in timesteps]
        info.update(order=[names[i] for i in order], dominants=[names[d] for d in dominants], cache=settings.cache)
    else:
        dominants, plan = None, [[True] * n for _ in timesteps]
    cache = DeepFeatureCache()
    switch = UNetAdapterSwitch(unet)
    for s, t in enumerate(timesteps):
        model_in = torch.cat([latents] * 2) if do_cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        weights = step_weights(dominants[s], n, settings.dominant_weight) if dominants else [1.0 / n] * n
        eps = None
        for i in range(n):
            switch.activate([names[i]], [scales[i]])
            if controller is not None:
                controller.set_states(contexts[i]["regions"])
            out = cache.run(
                names[i], s, plan[s][i], unet, model_in, t, contexts[i]["embeds"], settings.cache_depth,
                added_cond_kwargs=added[i],
            )
            if do_cfg:
                uncond, cond = out.chunk(2)
                out = uncond + settings.cfg * (cond - uncond)
            eps = weights[i] * out if eps is None else eps + weights[i] * out
        latents = scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
    info["passes"] = cache.counts()
    info["plan"] = [[int(f) for f in row] for row in plan]
    return decode_latents(pipe, latents)


def settings_dict(settings: SamplerSettings) -> dict:
    return asdict(settings)
