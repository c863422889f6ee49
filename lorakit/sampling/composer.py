"""Multi-LoRA composition at sampling time: merge, LoRA Switch, LoRA Composite, CMLoRA and delta composite.

Every method runs the same denoising loop over the pipeline's UNet, scheduler and VAE (:func:`generate`). At each
step a method lists its :class:`Term` s: which adapters are active for one UNet pass (none = the base model) and
the coefficients of that pass's unconditional and conditional predictions; the step's noise is
``U + cfg * (C - U)`` with ``U = sum_k u_k * uncond_k`` and ``C = sum_k c_k * cond_k``. Every UNet call goes
through :func:`unet_pass`, the one place to thread extra UNet inputs.

* ``merge``: all adapters active in one pass (u = c = 1).
* ``switch``: one adapter per step, rotated as the reference's step-end callback does
  (:func:`lorakit.sampling.schedules.switch_schedule`).
* ``composite``: each adapter alone, u = c = 1/N (the reference averages the N CFG pairs).
* ``cmlora``: composite with CMLoRA's dominant weights, rotation and per-adapter deep-feature cache
  (:func:`lorakit.sampling.schedules.cmlora_plan`).
* ``delta``: the base prediction plus the sum of each adapter's difference from it
  (u = c = 1 per adapter, 1 - N for the base); with ``masks="attention"`` each difference is multiplied by a mask
  from the base pass's cross-attention (:mod:`lorakit.sampling.attention_masks`).

``uncond="base"`` takes the unconditional half from the base model for every method (one base pass, adapters
on the conditional half only; delta keeps its base conditional term:
``U_base + cfg * (C_base - U_base) + cfg * sum_i (C_i - C_base)``). ``encode="once"`` (the reference) encodes the prompt once with the adapters active
at the start (all of them; switch: the first); ``"per-adapter"`` gives each pass the text features of its own
adapters. Base passes always use the base text encoder.
"""

from __future__ import annotations

import torch

from lorakit.conditioning import is_sdxl, sdxl_time_ids
from lorakit.models import sd_scheduler
from lorakit.sampling.attention_masks import attention_masks
from lorakit.sampling.cache import DeepFeatureCache
from lorakit.sampling.conditions import SpatialConditions, load_conditions
from lorakit.sampling.loading import LoadedAdapter, file_sha256, load_adapters
from lorakit.sampling.methods import SAMPLERS, Plan, SamplerSettings, Term, method_plan
from lorakit.sampling.prompt_parts import adapter_prompt_parts, adapter_triggers, class_word_prompts
from lorakit.sampling.regional import RegionalController, install_regional, remove_regional, warn_empty_boxes

METHODS = SAMPLERS  # name -> Sampler (lorakit.sampling.methods)

__all__ = ["METHODS", "LoadedAdapter", "SamplerSettings", "Term", "file_sha256", "generate", "load_adapters",
           "unet_pass"]


class UNetAdapterSwitch:
    """Activate adapters on the UNet's peft layers quickly (the per-module part of diffusers' ``set_adapters``).

    diffusers' ``set_adapters`` walks every module of every component; the loop switches the UNet's adapters once
    per UNet pass, so the peft layers are collected once here. ``activate([], [])`` runs the base model.
    """

    def __init__(self, unet):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        self.active: tuple | None = None
        self.scales: dict[str, float] = {}

    def activate(self, names: list[str], weights: list[float]) -> None:
        key = (tuple(names), tuple(weights))
        if key == self.active:
            return
        for n, w in zip(names, weights):
            if self.scales.get(n) != w:
                for layer in self.layers:
                    layer.set_scale(n, w)
                self.scales[n] = w
        for layer in self.layers:
            if hasattr(layer, "_active_adapter"):
                # Sampling needs no gradients: skip set_adapter's requires_grad walk over every adapter's weights
                # (measured 0.012 s per switch on a 192-layer UNet, a third of a shallow UNet pass).
                layer._active_adapter = list(names)
            else:  # pragma: no cover - another peft layout
                layer.set_adapter(list(names))
        self.active = key


_is_xl = is_sdxl


def encode(pipe, prompt: str, negative_prompt: str | None, batch: int, do_cfg: bool) -> dict:
    """Text features of one prompt for a batch, via ``pipe.encode_prompt`` with the currently active adapters.

    Returns:
        ``{'embeds': [2B or B, L, D], 'pos', 'neg'}`` (negative rows first under CFG) plus, for SDXL, ``'pooled'``
        ``[2B or B, P]``, ``'pos_pooled'``, ``'neg_pooled'``.
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


def set_scheduler(pipe, name: str | None) -> None:
    """Replace the pipeline's scheduler by a named one (``lorakit.models.sd_scheduler`` names), keeping its config."""
    if not name:
        return

    template = sd_scheduler(name)
    extra = {k: True for k in ("use_karras_sigmas",) if template.config.get(k)}
    pipe.scheduler = type(template).from_config(pipe.scheduler.config, **extra)


def image_size(pipe, settings: SamplerSettings) -> tuple[int, int]:
    """(height, width) in pixels: the settings' or the UNet's default."""
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return settings.height or default, settings.width or default


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


def unet_pass(unet, sample, timestep, text, added_cond_kwargs=None, cache: DeepFeatureCache | None = None,
              cache_key: str = "", full: bool = True, depth: int = 1, step: int = 0, layer: int = 0,
              **unet_kwargs) -> torch.Tensor:
    """The one UNet call of every method. Extra UNet inputs go in ``unet_kwargs``: the spatial conditions'
    ``down_intrablock_additional_residuals`` (T2I-Adapter), ``down_block_additional_residuals`` and
    ``mid_block_additional_residual`` (ControlNet); lists are copied (the UNet pops from them).

    Args:
        sample: scaled latents ``[R, C, h, w]`` (R = B or 2B rows); text: ``[R, L, D]``.
        cache: with a :class:`DeepFeatureCache`, a split pass: ``full`` refreshes ``cache_key``'s deep feature,
            otherwise a shallow pass reuses it (split at depth ``depth``, layer ``layer``).
    Returns:
        The noise prediction ``[R, C, h, w]``.
    """
    unet_kwargs = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in unet_kwargs.items()}
    if cache is None:
        return unet(sample, timestep, encoder_hidden_states=text, added_cond_kwargs=added_cond_kwargs,
                    return_dict=False, **unet_kwargs)[0]
    return cache.run(cache_key, step, full, unet, sample, timestep, text, depth, layer,
                     added_cond_kwargs=added_cond_kwargs, **unet_kwargs)


def _rows(t: torch.Tensor, rows: str) -> torch.Tensor:
    """The rows of a ``[2B, ...]`` CFG tensor (negative first) a pass needs: pair, uncond or cond."""
    if rows == "pair":
        return t
    neg, pos = t.chunk(2)
    return neg if rows == "uncond" else pos


class _Contexts:
    """Text features per (adapter set, prompt), encoded on first use (with all of the pipeline's components'
    adapters). With ``parts`` (one prompt per adapter) a pass with one adapter gets its own part."""

    def __init__(self, pipe, adapters, prompt, negative_prompt, batch, do_cfg, regions, joint: tuple | None,
                 parts: list[str] | None = None):
        self.pipe, self.adapters, self.prompt, self.negative = pipe, adapters, prompt, negative_prompt
        self.batch, self.do_cfg, self.regions, self.joint, self.parts = batch, do_cfg, regions, joint, parts
        self.cache: dict = {}

    def _encode(self, prompt: str) -> dict:
        ctx = encode(self.pipe, prompt, self.negative, self.batch, self.do_cfg)
        if self.regions is not None and self.regions.regions:
            ctx["regions"] = [
                encode(self.pipe, r.prompt, r.negative_prompt if r.negative_prompt is not None else self.negative,
                       self.batch, self.do_cfg)["embeds"]
                for r in self.regions.regions
            ]
        return ctx

    def get(self, active: tuple[int, ...], part: int | None = None) -> dict:
        if part is None and len(active) == 1:
            part = active[0]
        prompt = self.parts[part] if self.parts is not None and part is not None else self.prompt
        encoder = active if (not active or self.joint is None) else self.joint
        key = (encoder, prompt)
        if key not in self.cache:
            if encoder:
                self.pipe.enable_lora()
                self.pipe.set_adapters([self.adapters[i].name for i in encoder],
                                       [self.adapters[i].weight for i in encoder])
                self.cache[key] = self._encode(prompt)
            else:
                self.pipe.disable_lora()
                try:
                    self.cache[key] = self._encode(prompt)
                finally:
                    self.pipe.enable_lora()
        return self.cache[key]


def prompt_parts_of(settings: SamplerSettings, adapters: list[LoadedAdapter], prompt: str,
                    regions=None) -> tuple[str, list[str] | None]:
    """The base passes' prompt and each adapter's part of ``prompt`` (``joint``: ``(prompt, None)``;
    ``per-adapter``: its trigger's tags plus the tags of no trigger; ``class-words``: every trigger word out for
    the base, its own put back for each adapter). Triggers: ``settings.triggers``, else each file's
    ``lorakit.trigger`` metadata."""
    mode = settings.prompt_parts
    if mode == "joint" or not adapters:
        return prompt, None
    if regions is not None:
        raise ValueError(f"prompt_parts {mode} does not combine with regions (each region has its own prompt)")
    triggers = adapter_triggers(settings, adapters)
    if len(triggers) != len(adapters):
        raise ValueError(f"triggers: got {len(triggers)} words for {len(adapters)} adapters")
    missing = [a.name for a, t in zip(adapters, triggers) if not t]
    if missing:
        raise ValueError(f"prompt_parts {mode}: no trigger for {', '.join(missing)} (no lorakit.trigger "
                         "metadata; set --triggers)")
    if mode == "class-words":
        return class_word_prompts(prompt, triggers)
    return prompt, adapter_prompt_parts(prompt, triggers)


def _time_ids(pipe, height: int, width: int, rows: int, dtype) -> torch.Tensor:
    return sdxl_time_ids((height, width), (0, 0), (height, width), rows, dtype, pipe._execution_device)


def _term_rows(term: Term, do_cfg: bool) -> str | None:
    """Which rows a term's pass needs (None: it contributes nothing)."""
    if not do_cfg:
        return "cond" if term.c else None
    if term.u and term.c:
        return "pair"
    return "uncond" if term.u else ("cond" if term.c else None)


@torch.no_grad()
def generate(pipe, adapters: list[LoadedAdapter], settings: SamplerSettings, prompt: str, negative_prompt: str | None,
             seeds: list[int], regions=None, order: list[int] | None = None, n_rotation: int | None = None,
             output_type: str = "pil", conditions: list | None = None, kinds: list[str | None] | None = None):
    """Generate one image per seed for one prompt with a composition method.

    Args:
        pipe: a diffusers SD/SDXL pipeline with ``adapters`` loaded (:func:`load_adapters`). With no adapters
            (e.g. a fused model) every method is plain sampling of ``pipe``.
        settings: method and sampler settings.
        seeds: one seed per image; image i's initial noise (and any scheduler noise) comes from ``seeds[i]``.
        regions: optional :class:`lorakit.sampling.regional.RegionSpec`; its global prompt replaces ``prompt``.
        order: cmlora only: adapter indices in pass order (default: the given order); the first ``n_rotation``
            (default all) rotate as dominant, the rest are backgrounds (:func:`lorakit.sampling.schedules.cmlora_plan`).
        output_type: ``"pil"`` or ``"latent"`` (the final latents ``[B, C, h, w]``, before the VAE).
        conditions: loaded spatial conditions (:class:`lorakit.sampling.conditions.Condition`); default: those of
            ``regions`` (loaded here).
        kinds: ``--masks attention`` only: each adapter's kind (style: everywhere, background: outside the other
            adapters' masks; :mod:`lorakit.sampling.attention_masks`); default: the files' ``lorakit.category``.
    Returns:
        ``(images, info)``: PIL images ``[len(seeds)]`` (or latents) and a dict with the method's schedule
        (switch order, CMLoRA dominants and cache plan) and UNet pass counts.
    """
    settings.check()
    set_scheduler(pipe, settings.scheduler)
    height, width = image_size(pipe, settings)
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    do_cfg = settings.cfg > 1.0 and pipe.unet.config.time_cond_proj_dim is None
    if regions is not None:
        prompt, negative_prompt = regions.prompt, regions.negative_prompt
    n = len(adapters)
    pipe.scheduler.set_timesteps(settings.steps, device=pipe._execution_device)
    plan = _plan(settings, n, len(pipe.scheduler.timesteps), order, n_rotation)
    joint = None if settings.encode == "per-adapter" else ((0,) if settings.method == "switch" else tuple(range(n)))
    base_prompt, parts = prompt_parts_of(settings, adapters, prompt, regions)
    contexts = _Contexts(pipe, adapters, base_prompt, negative_prompt, len(seeds), do_cfg, regions, joint, parts)
    for step_terms in plan.terms:  # encode up front: set_adapters also touches the UNet
        for term in step_terms:
            contexts.get(term.adapters, term.part)
    spatial = _spatial_conditions(pipe, regions, conditions, height, width)
    masks = _attention_masks(pipe, settings, adapters, prompt, base_prompt, kinds, regions, height, width, do_cfg)
    controller, previous = _install_regions(pipe, regions, height, width)
    previous = masks.install(pipe.unet) if masks is not None else previous
    try:
        latents, passes = _denoise(pipe, settings, adapters, plan, contexts, controller, generators, height, width, do_cfg,
                                   spatial, masks)
    finally:
        if previous is not None:
            remove_regional(pipe.unet, previous)
    info = _run_info(pipe, settings, adapters, plan, passes, height, width, parts)
    if output_type == "latent":
        return latents, info
    return decode_latents(pipe, latents), info


def _plan(settings: SamplerSettings, n: int, n_steps: int, order, n_rotation) -> Plan:
    """The method's per-step terms for ``n`` adapters; with none (e.g. a fused model), plain sampling."""
    if n:
        return method_plan(settings, n, n_steps, order, n_rotation)
    return Plan([[Term((), 1.0, 1.0)]] * n_steps, {"note": "no adapters: plain sampling"})


def _attention_masks(pipe, settings, adapters, prompt, base_prompt, kinds, regions, height: int, width: int,
                     do_cfg: bool):
    if settings.masks == "attention" and regions is not None and regions.regions:
        raise ValueError("masks attention does not combine with regions (both set the cross-attention processors)")
    hw = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return attention_masks(pipe, settings, adapters, prompt, kinds, hw, do_cfg, base_prompt)


def _install_regions(pipe, regions, height: int, width: int):
    """Region attention for ``regions`` installed on the UNet: ``(controller, previous processors)``, or
    ``(None, None)`` without regions."""
    if regions is None or not regions.regions:
        return None, None

    warn_empty_boxes(regions, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    controller = RegionalController([r.box for r in regions.regions], aspect=width / height,
                                    rounding=getattr(regions, "box_rounding", "inside"))
    return controller, install_regional(pipe.unet, controller)


def _spatial_conditions(pipe, regions, conditions, height: int, width: int):
    """The spatial conditions (T2I-Adapter / ControlNet) of a run: ``conditions``, else those of ``regions``."""
    if conditions is None and regions is not None and getattr(regions, "conditions", None):
        conditions = load_conditions(regions.conditions, pipe.unet.device, pipe.unet.dtype, regions.source)
    if not conditions:
        return None

    latent_hw = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return SpatialConditions(conditions, pipe.unet, width, height, latent_hw,
                             getattr(regions, "box_rounding", "inside") if regions is not None else "inside")


def _run_info(pipe, settings: SamplerSettings, adapters, plan: Plan, passes: dict, height: int, width: int,
              parts: list[str] | None = None) -> dict:
    """What the sidecar records of a run: method, size, the plan's schedule with adapter names, pass counts, and
    the per-adapter prompt parts if any."""
    info = {"method": settings.method, "height": height, "width": width, **plan.info, "passes": passes}
    if parts is not None:
        info["prompt_parts"] = parts
    if plan.info.get("cache"):
        info["cache_split"] = [settings.cache_depth, settings.cmlora_cache_layer(pipe.unet)]
    for key in ("order", "dominants", "active_per_step"):
        if key in info:
            info[key] = [adapters[i].name for i in info[key]]
    return info


def _count(log: dict, key: str, term: Term, step: int) -> None:
    entry = log.setdefault(key, {"full": 0, "shallow": 0, "full_steps": []})
    entry["full" if term.full else "shallow"] += 1
    if term.full:
        entry["full_steps"].append(step)


def _accumulate(uncond, cond, term: Term, out: torch.Tensor, rows: str):
    """``(U, C)`` with one pass's output added at its term's coefficients."""
    u_out, c_out = out.chunk(2) if rows == "pair" else ((out, None) if rows == "uncond" else (None, out))
    if u_out is not None:
        uncond = term.u * u_out if uncond is None else uncond + term.u * u_out
    if c_out is not None:
        cond = term.c * c_out if cond is None else cond + term.c * c_out
    return uncond, cond


def _denoise(pipe, settings, adapters, plan, contexts, controller, generators, height, width, do_cfg, spatial=None,
             masks=None):
    """The denoising loop shared by every method; returns (final latents, pass counts)."""
    unet, scheduler = pipe.unet, pipe.scheduler
    device, batch = pipe._execution_device, len(generators)
    names, scales = [a.name for a in adapters], [a.weight for a in adapters]
    dtype = contexts.get(plan.terms[0][0].adapters)["embeds"].dtype
    latents = pipe.prepare_latents(batch, unet.config.in_channels, height, width, dtype, device, generators)
    extra = pipe.prepare_extra_step_kwargs(generators, 0.0)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    xl = _is_xl(pipe)
    time_ids = {r: _time_ids(pipe, height, width, r * batch, dtype) for r in (1, 2)} if xl else {}
    switch, cache, log = UNetAdapterSwitch(unet), DeepFeatureCache(), {}
    layer = settings.cmlora_cache_layer(unet) if settings.method == "cmlora" else 0
    n_steps = len(scheduler.timesteps)
    for s, t in enumerate(scheduler.timesteps):
        x = scheduler.scale_model_input(torch.cat([latents] * 2) if do_cfg else latents, t)
        uncond = cond = None
        for term in plan.terms[s]:
            rows = _term_rows(term, do_cfg)
            if rows is None:
                continue
            ctx = contexts.get(term.adapters, term.part)
            pick = (lambda v: _rows(v, rows)) if do_cfg else (lambda v: v)
            switch.activate([names[i] for i in term.adapters], [scales[i] for i in term.adapters])
            if controller is not None:
                controller.set_states([pick(r) for r in ctx["regions"]])
            added = {"text_embeds": pick(ctx["pooled"]), "time_ids": time_ids[2 if rows == "pair" else 1]} if xl else None
            key = "+".join(names[i] for i in term.adapters) or "base"
            key += f"@{names[term.part]}" if term.part is not None else ""
            sample, text = pick(x), pick(ctx["embeds"])
            cond_kw = spatial.unet_kwargs(s, rows, sample, t, text, added, n_steps) if spatial is not None else {}
            if masks is not None:
                masks.before_pass(term)
            out = unet_pass(unet, sample, t, text, added, cache if term.cached else None,
                            f"{key}|{rows}", term.full, settings.cache_depth, s, layer, **cond_kw)
            _count(log, key, term, s)
            out = masks.after_pass(term, out) if masks is not None else out
            uncond, cond = _accumulate(uncond, cond, term, out, rows)
        eps = uncond + settings.cfg * (cond - uncond) if do_cfg else cond
        latents = scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
    passes = {"full": sum(e["full"] for e in log.values()), "shallow": sum(e["shallow"] for e in log.values()),
              "per_adapter": log}
    return latents, passes
