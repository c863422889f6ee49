"""Fusion of several adapters into one model or one adapter (``lorakit fuse``).

Methods: ``gradient`` (Mix-of-Show gradient fusion in closed form, :mod:`lorakit.fusion.gradient`) and the
weight merges ``weighted``/``cat``/``svd``/``ties``/``dare`` (:mod:`lorakit.fusion.merge`); activation
statistics in :mod:`lorakit.fusion.capture`.

A method is a function ``run(inputs: FuseInputs) -> FuseResult`` with a settings dataclass, registered by one
line in :mod:`lorakit.fusion.registry`; the command loads the adapters, resolves weights and prompts, and writes
the outputs (adapter file and/or pipeline folder + ``lorakit_fusion.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorakit.logs import warn

if TYPE_CHECKING:  # keep ``lorakit --help`` free of torch imports
    from lorakit.adapters.io import Adapter, LoraModule

DEFAULT_TEMPLATE = "photo of a {}"
# Held-out prompts of a trigger word for gradient fusion's ``--ridge auto`` (other wordings than the fit's).
HELDOUT_TEMPLATES = ("a picture of {}", "{}, high quality")
# Used for files with neither --prompts nor trigger metadata (e.g. LoRAs downloaded from the web).
GENERIC_PROMPTS = ["a photo", "a high quality picture"]


@dataclass
class FuseInputs:
    """Everything a fusion method gets.

    adapters/paths/names: the input adapters (loaded), their files and short names.
    weights: one multiplier per adapter (``--weights``, default 1.0).
    prompts / sample_prompts: per adapter, the prompts for text-side statistics and for sampling.
    val_prompts: per adapter, held-out prompts (gradient's ``--ridge auto``), see :func:`heldout_prompts`.
    load_pipe: ``load_pipe()`` returns the base pipeline on this process's device (loaded once; None without --base).
    settings: the method's settings dataclass (``lorakit.fusion.registry``), e.g. ``settings.steps``.
    """

    method: str
    adapters: list[Adapter]
    paths: list[str]
    names: list[str]
    weights: list[float]
    prompts: list[list[str]]
    sample_prompts: list[list[str]]
    rank: int | None
    seed: int
    load_pipe: Any
    settings: Any
    prompt_sources: list[str] = field(default_factory=list)
    val_prompts: list[list[str]] = field(default_factory=list)


@dataclass
class FuseResult:
    """What a method returns.

    modules: ``{key: LoraModule}``, the fused delta over the base (needed for ``--out-format adapter``).
    pipeline: the fused pipeline, when the method built it (else the command adds ``modules`` to the base).
    report: method-specific JSON-able details (settings, per-layer residuals...), merged into lorakit_fusion.json.
    extra / metadata: extra tensors and header metadata for the adapter file (ED-LoRA embeddings, token table).
    """

    modules: dict[str, LoraModule] | None = None
    pipeline: Any = None
    report: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


def concept_prompts(adapter: Adapter, name: str, given: str | None, template: str = DEFAULT_TEMPLATE):
    """Prompts for one adapter: from ``--prompts`` (``|``-separated), its ``lorakit.trigger``, or a generic default.

    Returns:
        (prompts for the text encoder / to_k,to_v statistics, prompts to sample, source) where source is
        ``"--prompts"``, ``"trigger"`` or ``"generic"``. Trigger ``t`` gives ``[template(t), t]`` and samples
        ``[template(t)]`` (the Mix-of-Show reference's "photo of a {c}" and "{c}").
    """
    if given:
        prompts = [p.strip() for p in given.split("|") if p.strip()]
        if not prompts:
            raise ValueError(f"--prompts for {name} is empty")
        return prompts, prompts, "--prompts"
    trigger = (adapter.metadata.get("lorakit.trigger") or "").strip()
    if trigger:
        return [template.format(trigger), trigger], [template.format(trigger)], "trigger"
    warn(f"{name}: no --prompts and no lorakit.trigger metadata; using generic prompts {GENERIC_PROMPTS} "
         "(give --prompts 'trigger words ...' for a fusion that knows what this adapter draws)")
    return list(GENERIC_PROMPTS), list(GENERIC_PROMPTS), "generic"


def heldout_prompts(adapter: Adapter, given: str | None, prompts_given: bool,
                    templates: tuple[str, ...] = HELDOUT_TEMPLATES) -> list[str]:
    """Held-out prompts of one adapter for gradient fusion's ridge choice: ``--val-prompts`` (``|``-separated),
    else its ``lorakit.trigger`` in ``templates`` when the fit prompts came from the trigger too, else none (the
    UNet stage then holds out other seeds only)."""
    if given:
        out = [p.strip() for p in given.split("|") if p.strip()]
        if not out:
            raise ValueError("--val-prompts entry is empty")
        return out
    trigger = (adapter.metadata.get("lorakit.trigger") or "").strip()
    if trigger and not prompts_given:
        return [t.format(trigger) for t in templates]
    return []
