"""Mix-of-Show gradient fusion, solved in closed form from activation Gram matrices.

Per layer with LoRA in any concept (METHODS.md section 2)::

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

Multi-process (``accelerate launch``): the work items of each stage (forward passes) are split between
processes and the statistics summed with ``accelerate.utils.reduce``; every process then solves the same sums,
so all hold the same fused model.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass, field

import torch

from lorakit.adapters.io import Adapter, LoraModule, live_path
from lorakit.fusion.capture import GramCollector, token_rows
from lorakit.logs import show_progress

log = logging.getLogger(__name__)

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


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

    steps: sampling steps recorded in the UNet stage (reference: 20, all recorded).
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
    batch: prompts x seeds per forward pass while capturing.
    max_conv_dim: solve a Conv2d on unfolded patches when in*kh*kw <= this; larger convs fall back to the
        weighted average (reported). 0 = weighted average for every conv.
    scheduler: a ``lorakit.models.sd_scheduler`` name for sampling; None = the pipeline's own.
    unet_inputs: what the UNet stage samples with besides concept i's UNet LoRA: ``fused_text`` (the fused
        text encoder and to_k/to_v, as the reference) or ``own`` (concept i's own text encoder and to_k/to_v too).
    """

    steps: int = 20
    resolution: int | None = None
    samples: int = 1
    val_samples: int = 1
    guidance: float = 1.0
    ridge: float | str = "auto"
    max_conv_dim: int = 4608
    seed: int = 0
    scheduler: str | None = None
    unet_inputs: str = "fused_text"
    ridge_target: str = "average"
    kv_rows: str = "all"
    batch: int = 8
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


# ------------------------------------------------------------------------------------------------ the solve

# Relative ridges ``lam / (trace(G) / in)`` tried by ``ridge="auto"``; ``inf`` is the ridge target itself (W0, or
# the weighted average with ``ridge_target="average"``).
RIDGE_GRID = (1e-8, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, float("inf"))
# ``ridge="auto"`` for a stage without held-out data (no validation prompts for the text-side stages).
RIDGE_WITHOUT_HELDOUT = 1e-2


class _Objective:
    """``objective(W0 + U E) = sum_i ||U E X_i - U_i D_i X_i||^2`` from statistics only.

    ``= tr(U^T U E G E^T) - 2 tr(U^T U E Pst^T) + K`` with ``K = sum_i ||U_i D_i X_i||^2`` (the objective of W0).
    """

    def __init__(self, U, prob: LayerProblem, order, G, P):
        self.UtU, self.G = U.T @ U, G
        self.Pst = torch.cat([P[i] for i in order], 0)
        self.K = float(sum((prob.ups[i].T @ prob.ups[i]).to(G.device).mul(P[i] @ prob.downs[i].to(G.device).T).sum()
                           for i in order))

    def __call__(self, E: torch.Tensor) -> float:
        return float((self.UtU * (E @ self.G @ E.T)).sum() - 2 * (self.UtU * (E @ self.Pst.T)).sum()) + self.K

    def relative(self, E: torch.Tensor) -> float | None:
        """objective / objective(W0): 0 = every concept reproduced, 1 = no better than dropping the LoRAs."""
        return max(self(E), 0.0) / self.K if self.K > 0 else None


def _check_finite(key: str, G: torch.Tensor, P: dict) -> None:
    if not bool(torch.isfinite(G).all()) or not all(bool(torch.isfinite(p).all()) for p in P.values()):
        raise ValueError(f"gradient fusion: the activations recorded at layer {key} contain NaN or inf "
                         "(check the base model, the adapters and --dtype)")


def _ridge_solve(G, rhs_base, target, rel: float, key: str) -> tuple[torch.Tensor, float]:
    """``(rhs_base + lam target) (G + lam I)^-1`` by Cholesky, ``lam = rel * trace(G) / in``; ``target`` for
    ``rel = inf``. Raises ValueError naming the layer when the system is singular."""
    if rel == float("inf"):
        return target.clone(), float("inf")
    n = G.shape[0]
    lam = rel * float(G.diagonal().sum()) / n
    L, info = torch.linalg.cholesky_ex(G + lam * torch.eye(n, dtype=G.dtype, device=G.device))
    if int(info.item()) != 0:
        raise ValueError(f"gradient fusion: layer {key}: the least-squares system is singular at ridge {rel:g} "
                         "(few or repeated activations); use --ridge auto or a larger --ridge")
    return torch.cholesky_solve((rhs_base + lam * target).T, L).T, lam


def _ridge_path(G, Pst, target, rels) -> list[tuple[float, torch.Tensor]]:
    """The ridge solutions for every relative ridge in ``rels`` from one eigendecomposition of ``G``."""
    n = G.shape[0]
    scale = float(G.diagonal().sum()) / n
    s, Q = torch.linalg.eigh(G)
    s = s.clamp(min=0)
    PQ, TQ = Pst @ Q, target @ Q
    out = []
    for rel in rels:
        if rel == float("inf"):
            out.append((rel, target.clone()))
            continue
        lam = rel * scale
        out.append((rel, ((PQ + lam * TQ) / (s + lam)) @ Q.T))
    return out


def solve_layer(G: torch.Tensor, P: dict[int, torch.Tensor], prob: LayerProblem, n_concepts: int,
                ridge: float | str, fallback: str | None = None, ridge_target: str = "base",
                val: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None,
                grid: tuple[float, ...] = RIDGE_GRID) -> LayerSolution:
    """Ridge least-squares fused delta of one layer, its ridge and its residuals.

    Args:
        G: ``[in, in]`` sum of all concepts' Gram matrices on the fit activations (float64).
        P: ``{i: D_i G_i}`` ``[r_i, in]``.
        prob: the layer's factors.
        n_concepts: N of the weighted-average baseline ``W0 + (1/N) sum_i a_i dW_i``.
        ridge: relative ridge (``lam = ridge * trace(G) / in``), or ``"auto"``: every value of ``grid`` is fitted
            on ``(G, P)`` and scored on the held-out statistics ``val = (G_val, P_val)``; the best one is then
            refitted on fit + held-out statistics together. ``"auto"`` without ``val`` uses
            ``RIDGE_WITHOUT_HELDOUT``.
        fallback: a reason to return the weighted average instead of solving (e.g. conv too large).
        ridge_target: the ridge pulls toward W0 (``base``) or the weighted average (``average``).
    Returns:
        :class:`LayerSolution`; its report has ``ridge`` (relative; ``inf`` = the target itself), ``residual`` =
        objective / objective(W0) on the activations fitted (0 = every concept reproduced), ``weighted_residual``
        (the same for the weighted average) and, with ``val``, ``heldout_residual`` (the fit-only solution at the
        chosen ridge on the held-out activations), ``heldout_weighted_residual`` and ``heldout_grid``.
    Raises:
        ValueError naming the layer for NaN/inf statistics or a singular system.
    """
    order = sorted(prob.ups)
    U = torch.cat([prob.ups[i] for i in order], 1).to(G.device)  # [out, R]
    D = torch.cat([prob.downs[i] for i in order], 0).to(G.device)  # [R, in]
    Dw = D / n_concepts
    report = {"stage": stage_of(prob.key), "in_dim": prob.in_dim, "rank": int(U.shape[1]), "concepts": len(order)}
    if fallback is None:
        _check_finite(prob.key, G, P)
        if val is not None:
            _check_finite(prob.key, *val)
        if float(G.diagonal().sum()) <= 0:
            fallback = "no activations reached this layer"
    if fallback is not None:
        report.update(method="weighted_fallback", reason=fallback, residual=None, weighted_residual=None)
        return LayerSolution(up=U, down=Dw, report=report)
    target = Dw if ridge_target == "average" else torch.zeros_like(D)
    Pst = torch.cat([P[i] for i in order], 0)
    G_all, P_all = G, P
    if ridge == "auto" and val is not None and float(val[0].diagonal().sum()) > 0:
        held = _Objective(U, prob, order, *val)
        scores = [(held.relative(E), rel) for rel, E in _ridge_path(G, Pst, target, grid)]
        best = min(scores, key=lambda t: (t[0] if t[0] is not None else float("inf"), -t[1]))
        rel = best[1]
        report.update(ridge_source="held-out", heldout_residual=best[0], heldout_weighted_residual=held.relative(Dw),
                      heldout_grid={f"{r:g}": v for v, r in scores})
        G_all = G + val[0]
        P_all = {i: P[i] + val[1][i] for i in order}
    elif ridge == "auto":
        rel = RIDGE_WITHOUT_HELDOUT
        report["ridge_source"] = "no held-out data"
    else:
        rel = float(ridge)
        report["ridge_source"] = "given"
    M, lam = _ridge_solve(G_all, torch.cat([P_all[i] for i in order], 0), target, rel, prob.key)
    fit = _Objective(U, prob, order, G_all, P_all)
    inf = rel == float("inf")  # JSON has no infinity: the ridge target itself is reported as "inf"
    report.update(method="closed_form", ridge="inf" if inf else rel, ridge_lambda=None if inf else lam,
                  residual=fit.relative(M),
                  weighted_residual=fit.relative(Dw))
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


@dataclass
class WorkItem:
    """One capture forward pass: ``prompts`` (with one seed each) of concept ``concept``; ``split`` is ``fit`` or
    ``val`` (held-out statistics for ``ridge="auto"``)."""

    concept: int
    prompts: list[str]
    seeds: list[int]
    split: str = "fit"


def run_stage(pipe, stage: str, probs: dict[str, LayerProblem], concepts: list[Concept], settings: GradientSettings,
              items: list[WorkItem], run_item, switch: list[LayerProblem] | None = None,
              base: dict[str, torch.Tensor] | None = None, rows_for=None,
              solver=None) -> tuple[dict[str, LayerSolution], dict]:
    """Capture statistics for one stage, reduce them across processes, solve every layer, write W* in place.

    Args:
        items: the forward passes, in a fixed global order; ``run_item(item)`` runs one.
        switch: layers set to each concept's own weights (``base`` + its delta) while its items run.
        rows_for: ``rows_for(item, component)`` -> ``[B, S]`` token-row mask for that component's layers (or None).
        solver: ``solver(prob, stats, n_concepts) -> LayerSolution`` instead of :func:`solve_layer` (benchmarks:
            the reference's LBFGS on ``stats.inputs``; needs ``settings.keep_inputs``).
    Returns:
        ({key: LayerSolution}, stage report with ``capture_s`` and ``solve_s``).
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
    splits = sorted({it.split for it in items})
    collectors: dict[str, dict[str, GramCollector]] = {sp: {} for sp in splits}
    for comp in sorted({p.component for p in solve_probs}):
        layers = {p.key: (p.path, p.downs) for p in solve_probs if p.component == comp}
        for sp in splits:
            collectors[sp][comp] = GramCollector(getattr(pipe, comp), layers, keep_inputs=settings.keep_inputs,
                                                 gram=solver is None)
    every = [c for per in collectors.values() for c in per.values()]
    weights = ConceptWeights(pipe, switch, base) if switch else None
    mine = _my_items(items)
    for c in every:
        c.__enter__()
    try:
        with torch.no_grad():
            for item in _progress(mine, f"fuse: {stage} capture", settings.progress):
                if weights is not None:
                    weights.set(item.concept)
                for sp, per in collectors.items():
                    for comp, c in per.items():
                        c.concept = item.concept if sp == item.split else None
                        c.rows = rows_for(item, comp) if rows_for is not None and sp == item.split else None
                run_item(item)
    finally:
        for c in every:
            c.__exit__(None, None, None)
        if weights is not None:
            weights.restore()
    t_capture = time.perf_counter() - t0
    for c in every:
        c.reduce()
    solutions: dict[str, LayerSolution] = {}
    t1 = time.perf_counter()
    for p in _progress(stage_probs, f"fuse: {stage} solve", settings.progress):
        if p.key in fallback:
            dev = getattr(pipe, p.component).get_submodule(p.path).weight.device
            zeros_G = torch.zeros(0, 0, dtype=torch.float64, device=dev)
            sol = solve_layer(zeros_G, {i: torch.zeros(0) for i in p.ups}, p, len(concepts), settings.ridge,
                              fallback=fallback[p.key])
        elif solver is not None:
            sol = solver(p, collectors["fit"][p.component].stats[p.key], len(concepts))
        else:
            st = collectors["fit"][p.component].stats[p.key]
            vst = collectors["val"][p.component].stats[p.key] if "val" in collectors else None
            val = (vst.G, vst.P) if vst is not None and settings.ridge == "auto" else None
            sol = solve_layer(st.G, st.P, p, len(concepts), settings.ridge, ridge_target=settings.ridge_target,
                              val=val)
            sol.report["tokens"] = int(st.tokens.item())
            if vst is not None:
                sol.report["heldout_tokens"] = int(vst.tokens.item())
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
        "forward_passes": {sp: sum(1 for it in items if it.split == sp) for sp in splits},
        "capture_s": round(t_capture, 3),
        "solve_s": round(time.perf_counter() - t1, 3),
        "total_s": round(time.perf_counter() - t0, 3),
    }
    if settings.keep_inputs:
        report["collectors"] = collectors["fit"]
        if "val" in collectors:
            report["val_collectors"] = collectors["val"]
    return solutions, report


def _call_pipe(pipe, prompts: list[str], seeds: list[int], steps: int, size: int | None, guidance: float):
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    kwargs = dict(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                  generator=gens)
    if size is not None:
        kwargs.update(height=size, width=size)
    return pipe(**kwargs)


def _batched(concept: int, pairs: list[tuple[str, int]], split: str, batch: int) -> list[WorkItem]:
    """``(prompt, seed)`` pairs of one concept in forward passes of at most ``batch``."""
    batch = max(1, int(batch))
    return [WorkItem(concept, [p for p, _ in pairs[k : k + batch]], [s for _, s in pairs[k : k + batch]], split)
            for k in range(0, len(pairs), batch)]


def work_items(concepts: list[Concept], settings: GradientSettings, kind: str) -> list[WorkItem]:
    """The capture passes of the text-side stages (``kind="text"``: each concept's prompts) or of the UNet stage
    (``kind="unet"``: sample prompts x ``samples`` seeds). With ``ridge="auto"`` they include the held-out passes:
    ``val_prompts``, and for the UNet ``val_sample_prompts`` (else the sample prompts) x ``val_samples`` other
    seeds."""
    items = []
    auto = settings.ridge == "auto"
    for i, c in enumerate(concepts):
        if kind == "text":
            fit = [(p, settings.seed + k) for k, p in enumerate(c.prompts)]
            val = [(p, settings.seed + k) for k, p in enumerate(c.val_prompts)] if auto else []
        else:
            fit = [(p, settings.seed + k * settings.samples + j) for k, p in enumerate(c.sample_prompts)
                   for j in range(settings.samples)]
            held = c.val_sample_prompts or c.sample_prompts
            val = [(p, settings.seed + 100_000 + k * settings.val_samples + j) for k, p in enumerate(held)
                   for j in range(settings.val_samples)] if auto else []
        items += _batched(i, fit, "fit", settings.batch) + _batched(i, val, "val", settings.batch)
    return items


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
        from lorakit.models import sd_scheduler

        pipe.scheduler = sd_scheduler(settings.scheduler)
    pipe.set_progress_bar_config(disable=True)
    prepared = prepare_concepts(pipe, concepts)
    probs = build_problems(pipe, concepts)
    device = pipe.unet.device
    solutions: dict[str, LayerSolution] = {}
    stages: dict[str, dict] = {}

    text_items = work_items(concepts, settings, "text")
    tokenizers = {"text_encoder": pipe.tokenizer, "text_encoder_2": getattr(pipe, "tokenizer_2", None)}
    ed_state = getattr(pipe, "_lorakit_edlora", None)
    concept_ids = set(ed_state.hooks["text_encoder"].token_map) if ed_state is not None else None

    def text_rows(item, comp):  # the reference's text-encoder rows: every token up to the end token, no padding
        return token_rows(tokenizers[comp], item.prompts, "prompt")

    def kv_rows(item, comp):
        return token_rows(pipe.tokenizer, item.prompts, settings.kv_rows, concept_ids, concepts[item.concept].trigger)

    def run_text(item):
        pipe.encode_prompt(prompt=item.prompts, device=device, num_images_per_prompt=1,
                           do_classifier_free_guidance=False)

    by_stage = {st: [p for p in probs.values() if stage_of(p.key) == st] for st in ("text_encoder", "cross_kv", "unet")}
    base = {p.key: getattr(pipe, p.component).get_submodule(p.path).weight.detach().clone() for p in probs.values()}
    sols, stages["text_encoder"] = run_stage(pipe, "text_encoder", probs, concepts, settings, text_items, run_text,
                                             by_stage["text_encoder"], base, rows_for=text_rows, solver=solver)
    solutions.update(sols)

    small = _min_resolution(pipe)

    def run_kv(item):  # one UNet step at the smallest size: to_k/to_v only read the text features
        _call_pipe(pipe, item.prompts, item.seeds, 1, small, 1.0)

    sols, stages["cross_kv"] = run_stage(pipe, "cross_kv", probs, concepts, settings, text_items, run_kv,
                                         rows_for=kv_rows, solver=solver)
    solutions.update(sols)

    def run_unet(item):
        _call_pipe(pipe, item.prompts, item.seeds, settings.steps, settings.resolution, settings.guidance)

    switch = by_stage["unet"] + (by_stage["text_encoder"] + by_stage["cross_kv"] if settings.unet_inputs == "own" else [])
    sols, stages["unet"] = run_stage(pipe, "unet", probs, concepts, settings, work_items(concepts, settings, "unet"),
                                     run_unet, switch, base, solver=solver)
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
        val_samples=args.val_samples,
        kv_rows=args.kv_rows,
        batch=args.capture_batch,
        max_conv_dim=args.max_conv_dim,
        seed=inputs.seed,
        scheduler=args.scheduler,
        ridge_target=args.ridge_target,
        unet_inputs=args.unet_inputs,
        progress=show_progress(),
    )
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
    out = fuse_gradient(pipe, concepts, settings)
    layers = out["layers"]
    res = [r["residual"] for r in layers.values() if r.get("residual") is not None]
    wres = [r["weighted_residual"] for r in layers.values() if r.get("weighted_residual") is not None]
    held = [(r["heldout_residual"], r["heldout_weighted_residual"]) for r in layers.values()
            if r.get("heldout_residual") is not None and r.get("heldout_weighted_residual") is not None]
    summary = {
        "layers": len(layers),
        "mean_residual": sum(res) / len(res) if res else None,
        "max_residual": max(res) if res else None,
        "mean_weighted_residual": sum(wres) / len(wres) if wres else None,
        "heldout_layers": len(held),
        "mean_heldout_residual": sum(h for h, _ in held) / len(held) if held else None,
        "mean_heldout_weighted_residual": sum(w for _, w in held) / len(held) if held else None,
        "capture_s": round(sum(st.get("capture_s", 0.0) for st in out["stages"].values()), 3),
        "solve_s": round(sum(st.get("solve_s", 0.0) for st in out["stages"].values()), 3),
        "fallback_layers": sorted(k for k, r in layers.items() if r["method"] != "closed_form"),
    }
    settings_dict = {k: v for k, v in settings.__dict__.items() if k not in ("progress", "keep_inputs")}
    report = {"settings": settings_dict, "summary": summary, "stages": out["stages"], "layers": layers}
    if out["edlora"]:
        report["edlora"] = out["edlora"]  # the concepts' pseudo-words / layer tokens in the fused tokenizer
    return FuseResult(modules=out["modules"], pipeline=pipe, report=report, extra=out["extra"],
                      metadata=out["metadata"])
