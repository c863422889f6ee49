"""Concept retention: how much of each concept's own noise-prediction change a fused or composed model keeps.

For concept i with adapter i, on that concept's prompts and on the same noisy latents and timesteps:

    delta_i = eps(base + adapter_i) - eps(base)        (what the concept's own LoRA changes)
    delta_f = eps(fused)            - eps(base)        (what the fused / composed model changes)

and, summed over all samples (flattened):

    projection = <delta_f, delta_i> / ||delta_i||^2      1 = keeps all of it, 0 = none, > 1 = overshoots
    cosine     = <delta_f, delta_i> / (||delta_f|| ||delta_i||)   direction kept (0 when delta_f = 0)
    rel_error  = ||delta_f - delta_i|| / ||delta_i||      0 = the concept's own model exactly

The fused model is a diffusers folder (``lorakit fuse --method gradient``), an adapter file (a ``fused-delta``
or any merged LoRA, applied on the base), or ``merge:W`` (sampling-time merge: every adapter active at weight W).
ED-LoRA concepts (``lorakit.kind = edlora``) are loaded with their concept tokens; their "base" prediction is the
base UNet and text encoder with the LoRA weights off but the learned token embeddings in place (the base alone
has no words for the concept). Noisy latents are standard normal (the marginal of x_t when latents have unit variance), one per sample, with
timesteps spread evenly over [50, 950]; no reference images are needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.adapters.edlora import load_edlora
from lorakit.adapters.io import Adapter, apply_adapter, load_adapter
from lorakit.conditioning import is_sdxl, sdxl_time_ids
from lorakit.logs import tqdm
from lorakit.models import load_base, pipeline_arch

DEFAULT_TEMPLATES = ("{trigger}", "a picture of {trigger}")


@dataclass
class ConceptSpec:
    """One concept: a display name, its adapter, the prompts that call it, and the adapter's file (needed for
    ED-LoRA files, whose concept tokens :func:`lorakit.adapters.edlora.load_edlora` adds to the pipeline)."""

    name: str
    adapter: object  # lorakit.adapters.io.Adapter
    prompts: list[str]
    path: str | None = None


def default_prompts(adapter, source: str | os.PathLike, templates=DEFAULT_TEMPLATES) -> list[str]:
    """Prompts for a concept from its adapter's ``lorakit.trigger`` metadata.

    Raises:
        ValueError naming the file when it has no trigger (then pass the prompts explicitly).
    """
    trigger = adapter.metadata.get("lorakit.trigger")
    if not trigger:
        raise ValueError(
            f"{source}: adapter has no lorakit.trigger metadata, so retention does not know its prompts; "
            "give them with --prompts (one entry per adapter, prompts separated by '|')"
        )
    return [t.format(trigger=trigger) for t in templates]


def noise_prediction(pipe, prompts: list[str], latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The UNet's noise prediction for each (prompt, latent, timestep), with the pipeline's own text encoder(s).

    Args:
        pipe: SD1/SD2 or SDXL diffusers pipeline (any active LoRA adapters apply).
        prompts: ``B`` texts; latents: ``[B, C, h, w]``; timesteps: ``[B]`` ints.
    Returns:
        ``[B, C, h, w]`` float32.
    """
    device = pipe.unet.device
    added = None
    if is_sdxl(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        h, w = (s * pipe.vae_scale_factor for s in latents.shape[-2:])
        time_ids = sdxl_time_ids((h, w), (0, 0), (h, w), len(prompts), embeds.dtype, device)
        added = {"text_embeds": pooled, "time_ids": time_ids}
    else:
        embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    dtype = pipe.unet.dtype
    out = pipe.unet(latents.to(device, dtype), timesteps.to(device), encoder_hidden_states=embeds, added_cond_kwargs=added)
    return out.sample.float().cpu()


def _probe_inputs(unet_config, prompts: list[str], samples: int, seed: int):
    """``samples`` (prompt, latent, timestep) triples, deterministic in ``seed``: prompts cycle, timesteps even."""
    g = torch.Generator().manual_seed(seed)
    size = unet_config.sample_size
    size = size if isinstance(size, int) else size[0]
    latents = torch.randn(samples, unet_config.in_channels, size, size, generator=g)
    timesteps = torch.linspace(50, 950, samples).round().long() if samples > 1 else torch.tensor([500])
    return [prompts[k % len(prompts)] for k in range(samples)], latents, timesteps


class _Accum:
    def __init__(self):
        self.dot = self.own = self.fused = self.err = self.base = 0.0

    def add(self, eps0, eps_i, eps_f):
        di, df = (eps_i - eps0).double(), (eps_f - eps0).double()
        self.dot += float((di * df).sum())
        self.own += float((di * di).sum())
        self.fused += float((df * df).sum())
        self.err += float(((df - di) ** 2).sum())
        self.base += float((eps0.double() ** 2).sum())

    def result(self) -> dict:
        own = self.own ** 0.5
        return {
            "projection": self.dot / self.own if self.own > 0 else float("nan"),
            "cosine": self.dot / (own * self.fused**0.5) if self.own > 0 and self.fused > 0 else 0.0,
            "rel_error": self.err**0.5 / own if own > 0 else float("nan"),
            "own_change": own / self.base**0.5 if self.base > 0 else float("nan"),
        }


def _rename(prompts: list[str], words: dict[str, str]) -> list[str]:
    """Prompts with ED-LoRA pseudo-words replaced by the names they got in a pipeline (``load_edlora``'s map)."""
    out = []
    for p in prompts:
        for old, new in words.items():
            if old != new:
                p = p.replace(old, new)
        out.append(p)
    return out


def _load_fused(fused, base_pipe, concept_names):
    """Turn the ``fused`` argument into (activate callable, pipeline to run, ED-LoRA word map for its prompts)."""
    if isinstance(fused, str) and fused.startswith("merge"):
        _, _, w = fused.partition(":")
        try:
            weight = float(w) if w else 0.8
        except ValueError as err:
            raise ValueError(f"--fused {fused!r}: expected merge or merge:WEIGHT (e.g. merge:0.8)") from err
        return (lambda: base_pipe.set_adapters(list(concept_names), [weight] * len(concept_names))), base_pipe, None
    if isinstance(fused, (str, os.PathLike)) and Path(fused).is_dir():
        fused = load_base(fused).to(base_pipe.unet.device, base_pipe.unet.dtype)
    elif isinstance(fused, (str, os.PathLike)):
        path, fused = fused, load_adapter(fused)
        if fused.kind == "edlora":
            words = load_edlora(base_pipe, path, adapter_name="lorakit_fused")["words"]
            return (lambda: base_pipe.set_adapters(["lorakit_fused"])), base_pipe, words
    if isinstance(fused, Adapter):
        if fused.kind == "edlora":
            raise ValueError("an ED-LoRA fused adapter must be given as a file path (its tokens are loaded from it)")
        apply_adapter(base_pipe, fused, "lorakit_fused")
        return (lambda: base_pipe.set_adapters(["lorakit_fused"])), base_pipe, None
    if hasattr(fused, "unet"):
        if pipeline_arch(fused) != pipeline_arch(base_pipe):
            raise ValueError(f"fused model is {pipeline_arch(fused)} but the base is {pipeline_arch(base_pipe)}")
        fused.set_progress_bar_config(disable=True)
        return (lambda: None), fused, None
    raise ValueError(f"--fused: expected a diffusers folder, an adapter .safetensors file or merge[:W], got {fused!r}")


def _add_concepts(base_pipe, concepts: list[ConceptSpec], names: list[str]) -> list[list[str]]:
    """Inject each concept's adapter into ``base_pipe`` as ``names[i]``; returns each concept's prompts as typed in
    ``base_pipe`` (ED-LoRA words may be renamed there)."""
    base_prompts = []
    for name, spec in zip(names, concepts):
        if spec.adapter.kind == "edlora":
            if not spec.path:
                raise ValueError(f"{spec.name}: an ED-LoRA concept needs its file path (ConceptSpec.path)")

            words = load_edlora(base_pipe, spec.path, adapter_name=name)["words"]
            base_prompts.append(_rename(spec.prompts, words))
        else:
            apply_adapter(base_pipe, spec.adapter, name)
            base_prompts.append(list(spec.prompts))
    return base_prompts


def _three_predictions(base_pipe, fused_pipe, activate_fused, name: str, inputs, fused_prompts):
    """Noise predictions of the base, the concept's own adapter ``name`` and the fused model on one batch."""
    p, x, t = inputs
    base_pipe.disable_lora()
    eps0 = noise_prediction(base_pipe, p, x, t)
    base_pipe.enable_lora()
    base_pipe.set_adapters([name])
    eps_i = noise_prediction(base_pipe, p, x, t)
    activate_fused()
    return eps0, eps_i, noise_prediction(fused_pipe, fused_prompts, x, t)


@torch.no_grad()
def retention(base_pipe, concepts: list[ConceptSpec], fused, samples: int = 8, seed: int = 0, batch_size: int = 8, progress: bool = False) -> dict:
    """Retention of every concept in a fused / composed model.

    Args:
        base_pipe: the base pipeline; the concepts' adapters (and an adapter-file ``fused``) are injected into it
            with peft (pass a copy if you need it unchanged).
        concepts: one :class:`ConceptSpec` per adapter.
        fused: a diffusers pipeline or folder, an ``Adapter`` or adapter file, or ``"merge[:W]"``.
        samples: noisy latents per concept (prompts cycle over them).
    Returns:
        ``{"concepts": [{"name", "prompts", "projection", "cosine", "rel_error", "own_change"}], "mean": {...}}``.
    """
    if not concepts:
        raise ValueError("retention needs at least one concept adapter")
    names = [f"lorakit_concept_{i}" for i in range(len(concepts))]
    base_prompts = _add_concepts(base_pipe, concepts, names)
    activate_fused, fused_pipe, fused_words = _load_fused(fused, base_pipe, names)
    rows = []
    bar = tqdm(total=len(concepts) * samples, desc="retention", disable=not progress)
    for i, (name, spec) in enumerate(zip(names, concepts)):
        if not spec.prompts:
            raise ValueError(f"{spec.name}: no prompts")
        prompts, latents, timesteps = _probe_inputs(base_pipe.unet.config, base_prompts[i], samples, seed + i)
        as_given = [spec.prompts[k % len(spec.prompts)] for k in range(samples)]
        if fused_pipe is not base_pipe:  # a fused folder has its own tokens: the prompts as given
            fused_prompts = as_given
        elif fused_words is not None:  # an ED-LoRA fused file loaded beside the concepts
            fused_prompts = _rename(as_given, fused_words)
        else:
            fused_prompts = prompts
        acc = _Accum()
        for s in range(0, samples, batch_size):
            inputs = prompts[s : s + batch_size], latents[s : s + batch_size], timesteps[s : s + batch_size]
            acc.add(*_three_predictions(base_pipe, fused_pipe, activate_fused, name, inputs,
                                        fused_prompts[s : s + batch_size]))
            bar.update(len(inputs[0]))
        rows.append({"name": spec.name, "prompts": spec.prompts, **acc.result()})
    bar.close()
    keys = ("projection", "cosine", "rel_error", "own_change")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    return {"concepts": rows, "mean": mean, "samples": samples, "seed": seed}
