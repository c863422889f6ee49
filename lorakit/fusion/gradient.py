"""Mix-of-Show gradient fusion, solved in closed form from activation Gram matrices.

Per layer with LoRA in any concept (docs/fusion.md)::

    W* = argmin_W  sum_i ||W X_i - (W0 + a_i dW_i) X_i||^2  +  lam ||W - T||^2
       = (sum_i (W0 + a_i dW_i) G_i + lam T) (sum_i G_i + lam I)^-1,        G_i = X_i X_i^T

with ``lam = ridge * trace(G) / in`` (relative to the Gram scale) and the ridge target ``T`` the weighted average
``W0 + (1/N) sum_i a_i dW_i`` (default) or W0. Writing ``a_i dW_i = U_i D_i`` (LoRA factors),
``W* - W0 = sum_i U_i (D_i G_i + lam D_i / N) (G + lam I)^-1``: an exact LoRA of rank ``sum_i r_i`` (one
Cholesky solve per layer, float64).

The ridge: an exact fit (lam -> 0) extrapolates badly to new prompts and seeds in weakly covered input
directions; the reference's few LBFGS iterations from W0 damp this as a side effect of stopping early (and keep
W0 in directions no input reaches). Here ``ridge="auto"`` (the default) walks the path from the exact fit
(smallest ridge of ``RIDGE_GRID``) to the target (``inf``) and picks, per layer, the point with the lowest
objective on held-out activations (each concept's held-out prompts and other seeds, captured like the fit's),
then refits on fit + held-out statistics at that ridge.

Stages, in the reference's order, each capturing statistics with hooks then solving every layer:
  1. ``text_encoder``: each concept's prompts through the text encoder(s) with that concept's LoRA; rows: every
     token from the start token to the end token (no padding), as the reference;
  2. ``cross_kv``: UNet ``attn2.to_k``/``attn2.to_v`` with inputs from the FUSED text encoder; rows: the padded
     sequence the UNet reads while sampling (``kv_rows="all"``, chosen by held-out measurement; ``"concept"`` is
     the reference's concept tokens + end token);
  3. ``unet``: every other UNet layer, inputs recorded while sampling each concept's prompts with that
     concept's LoRA on these layers (fused text encoder and fused to_k/to_v, as in the reference), all steps,
     several prompts and seeds per forward pass (``batch``).

Differences from the reference (on purpose): the solve is exact (with the ridge above) instead of 500/50 LBFGS
iterations; only Gram matrices are kept, never X (two per layer with ``ridge="auto"``: fit and held-out).

Modules: the per-layer solve in :mod:`lorakit.fusion.gradient_solve`, the capture stages in
:mod:`lorakit.fusion.gradient_stages` (both re-exported here), the hooks in :mod:`lorakit.fusion.capture`.

Multi-process (``accelerate launch``): the work items of each stage (forward passes) are split between
processes and the statistics summed with ``accelerate.utils.reduce``; every process then solves the same sums,
so all hold the same fused model.
"""


import json
import logging
import warnings
from dataclasses import dataclass, field

import torch

from lorakit.adapters import edlora as E
from lorakit.adapters.io import Adapter, live_path
from lorakit.fusion import FuseResult
from lorakit.fusion.capture import token_rows
from lorakit.fusion.edlora_fold import ConceptFold
from lorakit.fusion.gradient_solve import (  # noqa: F401  (re-exported: the gradient-fusion API lives here)
    RIDGE_GRID, RIDGE_WITHOUT_HELDOUT, TEXT_COMPONENTS, LayerProblem, LayerSolution, fused_weight, solution_module,
    solve_layer, stage_of,
)
from lorakit.fusion.gradient_stages import (  # noqa: F401  (re-exported)
    ConceptWeights, WorkItem, _call_pipe, _min_resolution, run_stage, work_items,
)
from lorakit.logs import show_progress
from lorakit.models import sd_scheduler

log = logging.getLogger(__name__)


@dataclass
class Concept:
    """One input adapter of a fusion.

    ``weight`` is ``a_i`` (multiplies the LoRA delta); ``prompts`` feed the text-encoder and to_k/to_v stages,
    ``sample_prompts`` the sampling stage. ``val_prompts`` / ``val_sample_prompts`` are held-out prompts (other
    prompts with the concept) that ``ridge="auto"`` scores the ridge on; the UNet stage also uses other seeds.
    ``trigger``: the trigger word(s) of a plain LoRA, comma-separated (its to_k/to_v rows).
    """

    name: str
    adapter: Adapter
    weight: float = 1.0
    prompts: list[str] = field(default_factory=list)
    sample_prompts: list[str] = field(default_factory=list)
    val_prompts: list[str] = field(default_factory=list)
    val_sample_prompts: list[str] = field(default_factory=list)
    trigger: str | None = None


@dataclass
class GradientSettings:
    """Knobs of gradient fusion (defaults from the Mix-of-Show reference where it has one).

    steps: sampling steps recorded in the UNet stage, all of them (default 10; the reference samples and records
        20: measured, 10 steps give the same held-out objective at half the capture cost, docs/fusion.md).
    resolution: sampling height = width in pixels; None = the pipeline default (512 SD1, 1024 SDXL).
    samples: samples (seeds) per sampling prompt.
    val_samples: held-out samples (other seeds) per held-out sampling prompt (``ridge="auto"`` only).
    guidance: CFG scale while recording (reference: 1.0, no CFG).
    ridge: ``"auto"`` (per layer, the relative ridge of ``RIDGE_GRID`` with the lowest objective on held-out
        activations) or a number: ``lam = ridge * trace(G) / in``.
    ridge_target: ``average`` (default: toward the weighted average ``W0 + (1/N) sum_i a_i dW_i``, so the ridge
        path runs from the exact fit to the weighted average and unseen input directions keep the average) or
        ``base`` (toward W0, as the spec's ``lam ||W - W0||^2``; measured worse on held-out activations).
    kv_rows: token rows of the to_k/to_v stage: ``all`` (default: the padded sequence the UNet reads while
        sampling), ``concept`` (the concept's tokens + the end token, the reference's) or ``prompt`` (every token
        up to the end token). With the held-out ridge, ``all`` measured best on held-out padded rows.
    kv_val_rows: token rows of the to_k/to_v stage's held-out statistics (``ridge="auto"``): ``prompt``
        (default: start..end token; padded positions repeat across prompts, so held-out padding rows are near-copies
        of the fitted ones and let an overfitting ridge through), ``all``, ``concept``, or None = ``kv_rows``.
    batch: prompts x seeds per forward pass while capturing.
    share_passes: every concept's prompts share forward passes (each prompt runs with its own concept's weights:
        LoRA deltas added per prompt by hooks); False: one concept per pass, its weights written into the layers.
    max_conv_dim: solve a Conv2d on unfolded patches (Gram ``(in*kh*kw)^2``) when in*kh*kw <= this; larger
        convs are handled by ``large_convs``. 0 = every conv.
    large_convs: ``subspace`` (default: solved within the span of the concepts' LoRA down matrices, ``W = W0 +
        U C D``, from an ``R x R`` Gram of the inputs seen through ``D``, ``R`` = sum of ranks; reported per layer
        as ``space``) or ``average`` (the weighted average, reported under ``fallback_layers``).
    scheduler: a ``lorakit.models.sd_scheduler`` name for sampling; None = the pipeline's own.
    unet_inputs: what the UNet stage samples with besides concept i's UNet LoRA: ``fused_text`` (the fused
        text encoder and to_k/to_v, as the reference) or ``own`` (concept i's own text encoder and to_k/to_v too).
    """

    steps: int = 10
    resolution: int | None = None
    samples: int = 1
    val_samples: int = 1
    guidance: float = 1.0
    ridge: float | str = "auto"
    max_conv_dim: int = 4608
    large_convs: str = "subspace"
    seed: int = 0
    scheduler: str | None = None
    unet_inputs: str = "fused_text"
    ridge_target: str = "average"
    kv_rows: str = "all"
    kv_val_rows: str | None = "prompt"
    batch: int = 8
    share_passes: bool = True
    progress: bool = True
    keep_inputs: bool = False  # tests / bench only: keep raw activations for the LBFGS reference



# ------------------------------------------------------------------------------------------------ problems


def build_problems(pipe, concepts: list[Concept]) -> dict[str, LayerProblem]:
    """Collect every layer any concept adapts, with each concept's scaled factors.

    Raises:
        ValueError naming the adapter and key for a module the base does not have or a shape that does not fit.
    """
    problems: dict[str, LayerProblem] = {}
    for i, concept in enumerate(concepts):
        for key, mod in concept.adapter.modules.items():
            mod = mod.to_lora()  # LoHa / LoKr: the full delta, exactly factored
            comp, path = key.split(".", 1)
            model = getattr(pipe, comp, None)
            if model is None:
                raise ValueError(f"{concept.name}: adapter has {key} but the base pipeline has no {comp}")
            live = live_path(model, path)
            try:
                layer = model.get_submodule(live)
            except AttributeError as err:
                raise ValueError(f"{concept.name}: the base has no module {key}") from err
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                raise ValueError(f"{concept.name}: {key} is a {type(layer).__name__}, expected Linear or Conv2d")
            shape = tuple(layer.weight.shape)
            prob = problems.setdefault(key, LayerProblem(key, comp, live, shape))
            if not (bool(torch.isfinite(mod.up).all()) and bool(torch.isfinite(mod.down).all())):
                raise ValueError(f"{concept.name}: {key} has NaN or inf in its LoRA weights")
            up = mod.up.reshape(mod.up.shape[0], -1).to(torch.float64) * (concept.weight * mod.scale)
            down = mod.down.reshape(mod.down.shape[0], -1).to(torch.float64)
            if up.shape != (shape[0], mod.rank) or down.shape != (mod.rank, prob.in_dim):
                raise ValueError(
                    f"{concept.name}: {key} has up {tuple(mod.up.shape)} / down {tuple(mod.down.shape)}, "
                    f"which does not fit the base weight {shape}"
                )
            prob.ups[i], prob.downs[i] = up, down
    return problems


def prepare_concepts(pipe, concepts: list[Concept]) -> dict:
    """Stage 0: put every ED-LoRA concept's layer-wise embeddings into the pipeline (Mix-of-Show's embedding
    concatenation), renaming pseudo-words that clash (``<cat1>`` -> ``<cat1#2>``) and rewriting that concept's
    prompts to match; installs ED-LoRA's per-layer cross-attention routing (:mod:`lorakit.adapters.edlora`).
    The LoRA weights are NOT injected: the stages set and fuse them. Plain LoRA / LoCon files need nothing.

    Returns:
        ``{"extra": embedding tensors, "metadata": ED-LoRA metadata, "edlora": table}`` for the outputs.
    """
    ed = [c for c in concepts if c.adapter.kind == "edlora"]
    if not ed:
        return {"extra": {}, "metadata": {}, "edlora": None}

    state = E._state(pipe)
    embeddings: dict[str, dict[str, torch.Tensor]] = {}
    table = []
    for c in ed:
        info, rows = E.read_edlora(c.adapter, c.name)
        for comp, words in rows.items():
            for w, emb in words.items():
                if not bool(torch.isfinite(emb).all()):
                    raise ValueError(f"{c.name}: the {comp} embedding of {w} has NaN or inf")
        if info["n_layers"] != state.n_layers or dict(info["components"]) != state.dims:
            raise ValueError(f"{c.name}: ED-LoRA for {info['n_layers']} cross-attention layers / encoders "
                             f"{info['components']}; the base has {state.n_layers} / {state.dims}")
        tokenizers = [getattr(pipe, E._TOKENIZER_OF[comp]) for comp in state.dims]
        words = {}
        for concept in info["concepts"]:
            for w in concept["words"]:
                words[w] = E._free_word(w, tokenizers)
        for comp in state.dims:
            renamed = {words[w]: r for w, r in rows[comp].items()}
            tokenizer = getattr(pipe, E._TOKENIZER_OF[comp])
            token_map = E.add_concept_tokens(tokenizer, getattr(pipe, comp), list(renamed), state.n_layers, renamed)
            state.hooks[comp].token_map.update(token_map)
            embeddings.setdefault(comp, {}).update(renamed)
        for w, new in words.items():
            if new != w:
                warnings.warn(f"{c.name}: pseudo-word {w} is taken by another input; it is {new} in the fused model",
                              stacklevel=2)
                for prompts in (c.prompts, c.sample_prompts, c.val_prompts, c.val_sample_prompts):
                    prompts[:] = [p.replace(w, new) for p in prompts]
        for concept in info["concepts"]:
            table.append(E.EDLoRAConcept(concept["name"], [words[w] for w in concept["words"]],
                                         concept.get("init_word", "")))
    arch = ed[0].adapter.arch or "sd1"
    carrier = E.edlora_adapter({}, embeddings, table, state.layers, arch)
    meta = {E.META_KEY: carrier.metadata[E.META_KEY], "lorakit.trigger": carrier.metadata["lorakit.trigger"]}
    return {"extra": carrier.extra, "metadata": meta, "edlora": json.loads(meta[E.META_KEY])}


def fuse_gradient(pipe, concepts: list[Concept], settings: GradientSettings | None = None, solver=None) -> dict:
    """Gradient-fuse ``concepts`` into ``pipe`` in place (all three stages).

    Args:
        pipe: a diffusers SD/SDXL pipeline holding the base weights (modified in place to the fused model).
        concepts: the adapters with their weights and prompts.
        solver: a per-layer solver replacing the closed form (see :func:`run_stage`; benchmarks only).
    Returns:
        ``{"modules": {key: LoraModule}`` (exact fused deltas ``W* - W0``), ``"layers": {key: report}``,
        ``"stages": {...}``, ``"extra"``/``"metadata"`` (from stage 0)}.
    """
    settings = settings or GradientSettings()
    if not concepts:
        raise ValueError("gradient fusion needs at least one adapter")
    if settings.scheduler:
        pipe.scheduler = sd_scheduler(settings.scheduler)
    pipe.set_progress_bar_config(disable=True)
    prepared = prepare_concepts(pipe, concepts)
    probs = build_problems(pipe, concepts)
    solutions, stages = _run_stages(pipe, concepts, settings, probs, solver)
    return {
        "modules": {k: solution_module(s, probs[k]) for k, s in solutions.items()},
        "layers": {k: s.report for k, s in solutions.items()},
        "stages": stages,
        "extra": prepared["extra"],
        "metadata": prepared["metadata"],
        "edlora": prepared["edlora"],
        "problems": probs,
    }


def _run_stages(pipe, concepts: list[Concept], settings: GradientSettings, probs: dict[str, LayerProblem],
                solver) -> tuple[dict[str, LayerSolution], dict[str, dict]]:
    """The text-encoder, to_k/to_v and UNet stages in order, each on the previous stages' fused weights."""
    device = pipe.unet.device
    text_items = work_items(concepts, settings, "text")
    tokenizers = {"text_encoder": pipe.tokenizer, "text_encoder_2": getattr(pipe, "tokenizer_2", None)}
    ed_state = getattr(pipe, "_lorakit_edlora", None)
    concept_ids = set(ed_state.hooks["text_encoder"].token_map) if ed_state is not None else None

    def text_rows(item, comp, split):  # the reference's text-encoder rows: every token up to the end token
        return token_rows(tokenizers[comp], item.prompts, "prompt")

    def kv_rows(item, comp, split):  # each prompt with its own concept's trigger
        mode = settings.kv_val_rows if split == "val" and settings.kv_val_rows else settings.kv_rows
        return torch.cat([token_rows(pipe.tokenizer, [p], mode, concept_ids, concepts[o].trigger)
                          for o, p in zip(item.owners, item.prompts)], 0)

    def run_text(item):
        pipe.encode_prompt(prompt=item.prompts, device=device, num_images_per_prompt=1,
                           do_classifier_free_guidance=False)

    small = _min_resolution(pipe)

    def run_kv(item):  # one UNet step at the smallest size: to_k/to_v only read the text features
        _call_pipe(pipe, item.prompts, item.seeds, 1, small, 1.0)

    def run_unet(item):
        _call_pipe(pipe, item.prompts, item.seeds, settings.steps, settings.resolution, settings.guidance)

    by_stage = {st: [p for p in probs.values() if stage_of(p.key) == st] for st in ("text_encoder", "cross_kv", "unet")}
    base = {p.key: getattr(pipe, p.component).get_submodule(p.path).weight.detach().clone() for p in probs.values()}
    own = settings.unet_inputs == "own"
    switch = by_stage["unet"] + (by_stage["text_encoder"] + by_stage["cross_kv"] if own else [])
    plan = [("text_encoder", text_items, run_text, by_stage["text_encoder"], text_rows),
            ("cross_kv", text_items, run_kv, None, kv_rows),
            ("unet", work_items(concepts, settings, "unet"), run_unet, switch, None)]
    solutions: dict[str, LayerSolution] = {}
    stages: dict[str, dict] = {}
    for stage, items, run_item, switch_probs, rows_for in plan:
        sols, stages[stage] = run_stage(pipe, stage, probs, concepts, settings, items, run_item, switch_probs,
                                        base if switch_probs else None, rows_for=rows_for, solver=solver)
        solutions.update(sols)
    return solutions, stages


def settings_from(opts, seed: int) -> GradientSettings:
    """:class:`GradientSettings` from the command's options (:class:`lorakit.fusion.settings.GradientOptions`)."""
    return GradientSettings(
        steps=opts.steps if opts.steps is not None else GradientSettings.steps, resolution=opts.resolution,
        samples=opts.samples,
        guidance=opts.guidance, ridge=opts.ridge, val_samples=opts.val_samples, kv_rows=opts.kv_rows,
        kv_val_rows=opts.kv_val_rows, batch=opts.capture_batch, max_conv_dim=opts.max_conv_dim,
        large_convs=opts.large_convs, seed=seed,
        scheduler=opts.scheduler, ridge_target=opts.ridge_target, unet_inputs=opts.unet_inputs,
        progress=show_progress(),
    )


def summary(layers: dict[str, dict], stages: dict[str, dict]) -> dict:
    """The report's ``summary``: mean / max relative residuals (fit and held-out), times, fallback layers."""
    res = [r["residual"] for r in layers.values() if r.get("residual") is not None]
    wres = [r["weighted_residual"] for r in layers.values() if r.get("weighted_residual") is not None]
    held = [(r["heldout_residual"], r["heldout_weighted_residual"]) for r in layers.values()
            if r.get("heldout_residual") is not None and r.get("heldout_weighted_residual") is not None]
    return {
        "layers": len(layers),
        "mean_residual": sum(res) / len(res) if res else None,
        "max_residual": max(res) if res else None,
        "mean_weighted_residual": sum(wres) / len(wres) if wres else None,
        "heldout_layers": len(held),
        "mean_heldout_residual": sum(h for h, _ in held) / len(held) if held else None,
        "mean_heldout_weighted_residual": sum(w for _, w in held) / len(held) if held else None,
        "capture_s": round(sum(st.get("capture_s", 0.0) for st in stages.values()), 3),
        "solve_s": round(sum(st.get("solve_s", 0.0) for st in stages.values()), 3),
        "fallback_layers": sorted(k for k, r in layers.items() if r["method"] != "closed_form"),
        "subspace_layers": sorted(k for k, r in layers.items() if "space" in r),
    }


def run(inputs) -> "FuseResult":
    """``lorakit fuse --method gradient``: :func:`fuse_gradient` on the base named by ``--base``."""
    pipe = inputs.load_pipe()
    if pipe is None:
        raise ValueError("--method gradient needs --base (the model the adapters were trained on)")
    settings = settings_from(inputs.settings, inputs.seed)
    concepts = []
    for i, (name, ad) in enumerate(zip(inputs.names, inputs.adapters)):
        val = inputs.val_prompts[i] if inputs.val_prompts else []
        trigger = (ad.metadata.get("lorakit.trigger") or "").strip() or None
        if settings.kv_rows == "concept" and trigger is None and ad.kind != "edlora":
            warnings.warn(f"{name}: no lorakit.trigger metadata: its to_k/to_v rows are the end token only "
                          "(--kv-rows prompt uses every prompt token)", stacklevel=2)
        concepts.append(Concept(name=name, adapter=ad, weight=inputs.weights[i], prompts=inputs.prompts[i],
                                sample_prompts=inputs.sample_prompts[i], val_prompts=list(val),
                                val_sample_prompts=list(val), trigger=trigger))
    fold = None
    if getattr(inputs.settings, "fold_concepts", False):  # ED-LoRA concepts -> plain words (edlora_fold)
        fold = ConceptFold.prepare(pipe, concepts, getattr(inputs.settings, "concept_word", None))
    out = fuse_gradient(pipe, concepts, settings)
    if fold is not None:
        out = fold.apply(pipe, concepts, out, settings.ridge)
    settings_dict = {k: v for k, v in settings.__dict__.items() if k not in ("progress", "keep_inputs")}
    report = {"settings": settings_dict, "summary": summary(out["layers"], out["stages"]), "stages": out["stages"],
              "layers": out["layers"]}
    if out.get("fold"):
        report["fold"] = out["fold"]  # the stand-in words of the folded ED-LoRA concepts
    if out["edlora"]:
        report["edlora"] = out["edlora"]  # the concepts' pseudo-words / layer tokens in the fused tokenizer
    return FuseResult(modules=out["modules"], pipeline=pipe, report=report, extra=out["extra"],
                      metadata=out["metadata"])
