"""Mix-of-Show gradient fusion, solved in closed form from activation Gram matrices.

Per layer with LoRA in any concept (METHODS.md section 2)::

    W* = argmin_W  sum_i ||W X_i - (W0 + a_i dW_i) X_i||^2  +  lam ||W - W0||^2
       = (sum_i (W0 + a_i dW_i) G_i + lam W0) (sum_i G_i + lam I)^-1,        G_i = X_i X_i^T

with ``lam = ridge * trace(G) / in`` (relative to the Gram scale). Writing ``a_i dW_i = U_i D_i`` (LoRA factors),
``W* - W0 = sum_i U_i (D_i G_i) (G + lam I)^-1``: an exact LoRA of rank ``sum_i r_i`` whose down matrices are
the accumulated ``P_i = D_i G_i`` times ``(G + lam I)^-1`` (one Cholesky solve per layer, float64).
The ridge keeps W0 in directions no concept's activations reach, as the reference's LBFGS (started at W0)
does implicitly.

Stages, in the reference's order, each capturing statistics with hooks then solving every layer:
  1. ``text_encoder``: each concept's prompts through the text encoder(s) with that concept's LoRA;
  2. ``cross_kv``: UNet ``attn2.to_k``/``attn2.to_v`` with inputs from the FUSED text encoder;
  3. ``unet``: every other UNet layer, inputs recorded while sampling each concept's prompts with that
     concept's LoRA on these layers (fused text encoder and fused to_k/to_v, as in the reference), all steps.

Differences from the reference (on purpose): the text-encoder and to_k/to_v stages see the padded 77-token
sequence the pipeline feeds the UNet (the reference's unpadded tokens are its prefix, identical under CLIP's
causal mask); the solve is exact instead of 500/50 LBFGS iterations; only Gram matrices are kept, never X.

Multi-process (``accelerate launch``): the work items of each stage (concept x prompt x sample) are split
between processes and the statistics summed with ``accelerate.utils.reduce``; every process then solves the
same sums, so all hold the same fused model.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass, field

import torch

from lorakit.adapters.io import Adapter, LoraModule, live_path
from lorakit.fusion.capture import GramCollector
from lorakit.logs import show_progress

log = logging.getLogger(__name__)

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


@dataclass
class Concept:
    """One input adapter of a fusion.

    ``weight`` is ``a_i`` (multiplies the LoRA delta); ``prompts`` feed the text-encoder and to_k/to_v stages,
    ``sample_prompts`` the sampling stage.
    """

    name: str
    adapter: Adapter
    weight: float = 1.0
    prompts: list[str] = field(default_factory=list)
    sample_prompts: list[str] = field(default_factory=list)


@dataclass
class GradientSettings:
    """Knobs of gradient fusion (defaults from the Mix-of-Show reference where it has one).

    steps: sampling steps recorded in the UNet stage (reference: 20, all recorded).
    resolution: sampling height = width in pixels; None = the pipeline default (512 SD1, 1024 SDXL).
    samples: samples (seeds) per sampling prompt.
    guidance: CFG scale while recording (reference: 1.0, no CFG).
    ridge: ridge strength, relative to trace(G)/in.
    ridge_target: ``base`` (toward W0, as the spec and the reference's LBFGS started at W0) or ``average``
        (toward the weighted average ``W0 + (1/N) sum_i a_i dW_i``: unseen directions keep the average).
    max_conv_dim: solve a Conv2d on unfolded patches when in*kh*kw <= this; larger convs fall back to the
        weighted average (reported). 0 = weighted average for every conv.
    scheduler: a ``lorakit.models.sd_scheduler`` name for sampling; None = the pipeline's own.
    unet_inputs: what the UNet stage samples with besides concept i's UNet LoRA: ``fused_text`` (the fused
        text encoder and to_k/to_v, as the reference) or ``own`` (concept i's own text encoder and to_k/to_v too).
    """

    steps: int = 20
    resolution: int | None = None
    samples: int = 1
    guidance: float = 1.0
    ridge: float = 1e-6
    max_conv_dim: int = 4608
    seed: int = 0
    scheduler: str | None = None
    unet_inputs: str = "fused_text"
    ridge_target: str = "base"
    progress: bool = True
    keep_inputs: bool = False  # tests / bench only: keep raw activations for the LBFGS reference


@dataclass
class LayerProblem:
    """The fusion problem of one layer: base weight and each concept's LoRA factors (flattened for convs)."""

    key: str  # adapter key, e.g. "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    component: str
    path: str  # live module path inside the component
    shape: tuple  # weight shape
    ups: dict[int, torch.Tensor] = field(default_factory=dict)  # U_i = a_i * scale_i * up_i  [out, r_i]
    downs: dict[int, torch.Tensor] = field(default_factory=dict)  # D_i [r_i, in_flat]

    @property
    def is_conv(self) -> bool:
        return len(self.shape) == 4

    @property
    def in_dim(self) -> int:
        return int(torch.Size(self.shape[1:]).numel())


@dataclass
class LayerSolution:
    """``W* = W0 + up @ down`` (flattened), with its report entry."""

    up: torch.Tensor  # [out, R] float64
    down: torch.Tensor  # [R, in_flat] float64
    report: dict


# ------------------------------------------------------------------------------------------------ problems


def stage_of(key: str) -> str:
    """Which stage fuses an adapter key: ``text_encoder``, ``cross_kv`` or ``unet``."""
    comp, path = key.split(".", 1)
    if comp in TEXT_COMPONENTS:
        return "text_encoder"
    if comp == "unet" and path.endswith(("attn2.to_k", "attn2.to_v")):
        return "cross_kv"
    return "unet"


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
            up = mod.up.reshape(mod.up.shape[0], -1).to(torch.float64) * (concept.weight * mod.scale)
            down = mod.down.reshape(mod.down.shape[0], -1).to(torch.float64)
            if up.shape != (shape[0], mod.rank) or down.shape != (mod.rank, prob.in_dim):
                raise ValueError(
                    f"{concept.name}: {key} has up {tuple(mod.up.shape)} / down {tuple(mod.down.shape)}, "
                    f"which does not fit the base weight {shape}"
                )
            prob.ups[i], prob.downs[i] = up, down
    return problems


# ------------------------------------------------------------------------------------------------ the solve


def solve_layer(G: torch.Tensor, P: dict[int, torch.Tensor], prob: LayerProblem, n_concepts: int, ridge: float,
                fallback: str | None = None, ridge_target: str = "base") -> LayerSolution:
    """Closed-form fused delta of one layer and its residuals.

    Args:
        G: ``[in, in]`` sum of all concepts' Gram matrices (float64).
        P: ``{i: D_i G_i}`` ``[r_i, in]``.
        prob: the layer's factors.
        n_concepts: N of the weighted-average baseline ``W0 + (1/N) sum_i a_i dW_i``.
        ridge: relative ridge toward W0.
        fallback: a reason to return the weighted average instead of solving (e.g. conv too large).
    Returns:
        :class:`LayerSolution`; its report has ``residual`` = objective(W*) / objective(W0) (share of the
        concepts' LoRA output energy not reproduced on their own activations; 0 is perfect) and
        ``weighted_residual``, the same for the weighted average.
    """
    order = sorted(prob.ups)
    U = torch.cat([prob.ups[i] for i in order], 1).to(G.device)  # [out, R]
    D = torch.cat([prob.downs[i] for i in order], 0).to(G.device)  # [R, in]
    Pst = torch.cat([P[i] for i in order], 0)  # [R, in]
    Dw = D / n_concepts
    trace = float(G.diagonal().sum())
    report = {"stage": stage_of(prob.key), "in_dim": prob.in_dim, "rank": int(U.shape[1]), "concepts": len(order)}
    if trace <= 0 and fallback is None:
        fallback = "no activations reached this layer"
    if fallback is None:
        n = G.shape[0]
        lam = ridge * trace / n
        A = G + lam * torch.eye(n, dtype=G.dtype, device=G.device)
        L, info = torch.linalg.cholesky_ex(A)
        if info.item() != 0:  # numerically indefinite: a larger ridge
            lam = max(lam, 1e-10 * trace / n) * 1e3
            L = torch.linalg.cholesky(G + lam * torch.eye(n, dtype=G.dtype, device=G.device))
        rhs = Pst if ridge_target == "base" else Pst + lam * Dw  # ridge toward W0 or toward the weighted average
        M = torch.cholesky_solve(rhs.T, L).T  # (P + lam Dw?) A^-1, [R, in]
        report.update(method="closed_form", ridge_lambda=lam)
    else:
        M = Dw
        report.update(method="weighted_fallback", reason=fallback)
    report["residual"] = report["weighted_residual"] = None
    if G.numel() and trace > 0:
        UtU = U.T @ U
        # K = sum_i ||U_i D_i X_i||^2: the objective of W0 (every LoRA effect dropped)
        K = float(sum((prob.ups[i].T @ prob.ups[i]).to(G.device).mul(P[i] @ prob.downs[i].to(G.device).T).sum()
                      for i in order))

        def objective(E: torch.Tensor) -> float:
            # objective(W0 + U E) = tr(U E G E^T U^T) - 2 tr(U E Pst^T U^T) + K
            return float((UtU * (E @ G @ E.T)).sum() - 2 * (UtU * (E @ Pst.T)).sum()) + K

        if K > 0:
            report["residual"] = max(objective(M), 0.0) / K
            report["weighted_residual"] = max(objective(Dw), 0.0) / K
    return LayerSolution(up=U, down=M, report=report)


def fused_weight(W0: torch.Tensor, sol: LayerSolution) -> torch.Tensor:
    """``W0 + up @ down`` in float64, reshaped like ``W0``, cast to its dtype."""
    delta = (sol.up @ sol.down).reshape(W0.shape)
    return (W0.to(torch.float64) + delta.to(W0.device)).to(W0.dtype)


def solution_module(sol: LayerSolution, prob: LayerProblem) -> LoraModule:
    """The exact fused delta ``W* - W0`` as a LoRA module (rank = sum of input ranks, alpha = rank)."""
    R = sol.up.shape[1]
    if prob.is_conv:
        up = sol.up.reshape(prob.shape[0], R, 1, 1)
        down = sol.down.reshape(R, *prob.shape[1:])
    else:
        up, down = sol.up, sol.down
    return LoraModule(down=down.float().cpu().contiguous(), up=up.float().cpu().contiguous(), alpha=float(R))


# ------------------------------------------------------------------------------------------------ stages


class ConceptWeights:
    """Set layers to one concept's ``W0 + a_i dW_i`` (W0 for layers it does not adapt); restore them afterwards.

    Args:
        probs: the layers to switch.
        base: ``{key: W0}`` base weights (default: the layers' current weights).
    """

    def __init__(self, pipe, probs: list[LayerProblem], base: dict[str, torch.Tensor] | None = None):
        self.probs = probs
        self.modules = {p.key: getattr(pipe, p.component).get_submodule(p.path) for p in probs}
        self.saved = {k: m.weight.detach().clone() for k, m in self.modules.items()}
        self.base = {k: (base[k] if base is not None else self.saved[k]) for k in self.modules}
        self.current: int | None = None

    @torch.no_grad()
    def set(self, concept: int | None) -> None:
        """Concept ``concept``'s weights; ``None`` restores the weights found at construction."""
        if concept == self.current:
            return
        for p in self.probs:
            w = self.modules[p.key].weight
            if concept is None:
                w.copy_(self.saved[p.key])
            elif concept in p.ups:
                delta = (p.ups[concept] @ p.downs[concept]).reshape(w.shape)
                w.copy_((self.base[p.key].to(torch.float64) + delta.to(w.device)).to(w.dtype))
            else:
                w.copy_(self.base[p.key])
        self.current = concept

    def restore(self) -> None:
        self.set(None)


def _my_items(items: list):
    """This process's share of ``items`` (all of them in a single process)."""
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes == 1:
        return list(items)
    with state.split_between_processes(list(items)) as mine:
        return list(mine)


def _progress(iterable, desc: str, enabled: bool, total: int | None = None):
    from accelerate import PartialState
    from lorakit.logs import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not (enabled and PartialState().is_main_process),
                leave=False, dynamic_ncols=True)


def _min_resolution(pipe) -> int:
    """Smallest image size the UNet accepts (latent divisible by its total downsampling)."""
    n_down = len(pipe.unet.config.down_block_types) - 1
    return int(pipe.vae_scale_factor) * (2**n_down)


def run_stage(pipe, stage: str, probs: dict[str, LayerProblem], concepts: list[Concept], settings: GradientSettings,
              items: list, run_item, switch: list[LayerProblem] | None = None,
              base: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, LayerSolution], dict]:
    """Capture statistics for one stage, reduce them across processes, solve every layer, write W* in place.

    Args:
        items: ``[(concept index, payload), ...]`` in a fixed global order; ``run_item(index, payload)`` runs it.
        switch: layers set to each concept's own weights (``base`` + its delta) while its items run.
    Returns:
        ({key: LayerSolution}, stage report).
    """
    t0 = time.perf_counter()
    stage_probs = [p for p in probs.values() if stage_of(p.key) == stage]
    if not stage_probs:
        return {}, {"layers": 0}
    fallback = {}
    for p in stage_probs:
        if p.is_conv and p.in_dim > settings.max_conv_dim:
            fallback[p.key] = f"conv in*kh*kw = {p.in_dim} > max_conv_dim {settings.max_conv_dim}"
    solve_probs = [p for p in stage_probs if p.key not in fallback]
    collectors = {}
    for comp in sorted({p.component for p in solve_probs}):
        layers = {p.key: (p.path, p.downs) for p in solve_probs if p.component == comp}
        collectors[comp] = GramCollector(getattr(pipe, comp), layers, keep_inputs=settings.keep_inputs)
    weights = ConceptWeights(pipe, switch, base) if switch else None
    indexed = list(enumerate(items))
    mine = _my_items(indexed)
    for c in collectors.values():
        c.__enter__()
    try:
        with torch.no_grad():
            for idx, (ci, payload) in _progress(mine, f"fuse: {stage} capture", settings.progress):
                if weights is not None:
                    weights.set(ci)
                for c in collectors.values():
                    c.concept = ci
                run_item(idx, payload)
    finally:
        for c in collectors.values():
            c.__exit__(None, None, None)
        if weights is not None:
            weights.restore()
    t_capture = time.perf_counter() - t0
    for c in collectors.values():
        c.reduce()
    solutions: dict[str, LayerSolution] = {}
    for p in _progress(stage_probs, f"fuse: {stage} solve", settings.progress):
        if p.key in fallback:
            dev = getattr(pipe, p.component).get_submodule(p.path).weight.device
            zeros_G = torch.zeros(0, 0, dtype=torch.float64, device=dev)
            sol = solve_layer(zeros_G, {i: torch.zeros(0) for i in p.ups}, p, len(concepts), settings.ridge,
                              fallback=fallback[p.key])
        else:
            st = collectors[p.component].stats[p.key]
            sol = solve_layer(st.G, st.P, p, len(concepts), settings.ridge, ridge_target=settings.ridge_target)
            sol.report["tokens"] = int(st.tokens.item())
        solutions[p.key] = sol
        module = getattr(pipe, p.component).get_submodule(p.path)
        with torch.no_grad():
            module.weight.copy_(fused_weight(module.weight.detach(), sol))
    if fallback:
        warnings.warn(
            f"gradient fusion: {len(fallback)} conv layer(s) use the weighted average instead of the solve "
            f"(raise --max-conv-dim to solve them): {', '.join(sorted(fallback)[:5])}"
            + (" ..." if len(fallback) > 5 else ""),
            stacklevel=2,
        )
    report = {
        "layers": len(stage_probs),
        "solved": len(stage_probs) - len(fallback),
        "fallback_layers": sorted(fallback),
        "work_items": len(items),
        "capture_s": round(t_capture, 3),
        "total_s": round(time.perf_counter() - t0, 3),
    }
    if settings.keep_inputs:
        report["collectors"] = collectors
    return solutions, report


def _call_pipe(pipe, prompt: str, steps: int, size: int | None, guidance: float, seed: int):
    g = torch.Generator("cpu").manual_seed(seed)
    kwargs = dict(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                  generator=g)
    if size is not None:
        kwargs.update(height=size, width=size)
    return pipe(**kwargs)


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
    from lorakit.adapters import edlora as E

    state = E._state(pipe)
    embeddings: dict[str, dict[str, torch.Tensor]] = {}
    table = []
    for c in ed:
        info, rows = E.read_edlora(c.adapter, c.name)
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
                c.prompts[:] = [p.replace(w, new) for p in c.prompts]
                c.sample_prompts[:] = [p.replace(w, new) for p in c.sample_prompts]
        for concept in info["concepts"]:
            table.append(E.EDLoRAConcept(concept["name"], [words[w] for w in concept["words"]],
                                         concept.get("init_word", "")))
    arch = ed[0].adapter.arch or "sd1"
    carrier = E.edlora_adapter({}, embeddings, table, state.layers, arch)
    meta = {E.META_KEY: carrier.metadata[E.META_KEY], "lorakit.trigger": carrier.metadata["lorakit.trigger"]}
    return {"extra": carrier.extra, "metadata": meta, "edlora": json.loads(meta[E.META_KEY])}


def fuse_gradient(pipe, concepts: list[Concept], settings: GradientSettings | None = None) -> dict:
    """Gradient-fuse ``concepts`` into ``pipe`` in place (all three stages).

    Args:
        pipe: a diffusers SD/SDXL pipeline holding the base weights (modified in place to the fused model).
        concepts: the adapters with their weights and prompts.
    Returns:
        ``{"modules": {key: LoraModule}`` (exact fused deltas ``W* - W0``), ``"layers": {key: report}``,
        ``"stages": {...}``, ``"extra"``/``"metadata"`` (from stage 0)}.
    """
    settings = settings or GradientSettings()
    if not concepts:
        raise ValueError("gradient fusion needs at least one adapter")
    if settings.scheduler:
        from lorakit.models import sd_scheduler

        pipe.scheduler = sd_scheduler(settings.scheduler)
    pipe.set_progress_bar_config(disable=True)
    prepared = prepare_concepts(pipe, concepts)
    probs = build_problems(pipe, concepts)
    device = pipe.unet.device
    solutions: dict[str, LayerSolution] = {}
    stages: dict[str, dict] = {}

    te_items = [(i, p) for i, c in enumerate(concepts) for p in c.prompts]

    def run_text(idx, prompt):
        pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)

    by_stage = {st: [p for p in probs.values() if stage_of(p.key) == st] for st in ("text_encoder", "cross_kv", "unet")}
    base = {p.key: getattr(pipe, p.component).get_submodule(p.path).weight.detach().clone() for p in probs.values()}
    sols, stages["text_encoder"] = run_stage(pipe, "text_encoder", probs, concepts, settings, te_items, run_text,
                                             by_stage["text_encoder"], base)
    solutions.update(sols)

    small = _min_resolution(pipe)

    def run_kv(idx, prompt):
        _call_pipe(pipe, prompt, 1, small, 1.0, settings.seed + idx)

    sols, stages["cross_kv"] = run_stage(pipe, "cross_kv", probs, concepts, settings, te_items, run_kv)
    solutions.update(sols)

    sample_items = [
        (i, (p, k)) for i, c in enumerate(concepts) for p in c.sample_prompts for k in range(settings.samples)
    ]

    def run_unet(idx, payload):
        prompt, _ = payload
        _call_pipe(pipe, prompt, settings.steps, settings.resolution, settings.guidance, settings.seed + idx)

    switch = by_stage["unet"] + (by_stage["text_encoder"] + by_stage["cross_kv"] if settings.unet_inputs == "own" else [])
    sols, stages["unet"] = run_stage(pipe, "unet", probs, concepts, settings, sample_items, run_unet, switch, base)
    solutions.update(sols)

    return {
        "modules": {k: solution_module(s, probs[k]) for k, s in solutions.items()},
        "layers": {k: s.report for k, s in solutions.items()},
        "stages": stages,
        "extra": prepared["extra"],
        "metadata": prepared["metadata"],
        "edlora": prepared["edlora"],
        "problems": probs,
    }


def run(inputs) -> "FuseResult":
    """``lorakit fuse --method gradient``: :func:`fuse_gradient` on the base named by ``--base``."""
    from lorakit.fusion import FuseResult

    args = inputs.args
    pipe = inputs.load_pipe()
    if pipe is None:
        raise ValueError("--method gradient needs --base (the model the adapters were trained on)")
    settings = GradientSettings(
        steps=args.steps if args.steps is not None else 20,
        resolution=args.resolution,
        samples=args.samples,
        guidance=args.guidance,
        ridge=args.ridge,
        max_conv_dim=args.max_conv_dim,
        seed=inputs.seed,
        scheduler=args.scheduler,
        ridge_target=args.ridge_target,
        unet_inputs=args.unet_inputs,
        progress=show_progress(),
    )
    concepts = [
        Concept(name=n, adapter=a, weight=w, prompts=p, sample_prompts=s)
        for n, a, w, p, s in zip(inputs.names, inputs.adapters, inputs.weights, inputs.prompts, inputs.sample_prompts)
    ]
    out = fuse_gradient(pipe, concepts, settings)
    layers = out["layers"]
    res = [r["residual"] for r in layers.values() if r.get("residual") is not None]
    wres = [r["weighted_residual"] for r in layers.values() if r.get("weighted_residual") is not None]
    summary = {
        "layers": len(layers),
        "mean_residual": sum(res) / len(res) if res else None,
        "max_residual": max(res) if res else None,
        "mean_weighted_residual": sum(wres) / len(wres) if wres else None,
        "fallback_layers": sorted(k for k, r in layers.items() if r["method"] != "closed_form"),
    }
    settings_dict = {k: v for k, v in settings.__dict__.items() if k not in ("progress", "keep_inputs")}
    report = {"settings": settings_dict, "summary": summary, "stages": out["stages"], "layers": layers}
    if out["edlora"]:
        report["edlora"] = out["edlora"]  # the concepts' pseudo-words / layer tokens in the fused tokenizer
    return FuseResult(modules=out["modules"], pipeline=pipe, report=report, extra=out["extra"],
                      metadata=out["metadata"])
