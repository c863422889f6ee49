"""The capture stages of gradient fusion (:mod:`lorakit.fusion.gradient`): forward passes with each concept's
weights, Gram statistics gathered by hooks (:mod:`lorakit.fusion.capture`), reduced across processes, then every
layer of the stage solved (:mod:`lorakit.fusion.gradient_solve`) and written in place."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lorakit.fusion.capture import GramCollector
from lorakit.fusion.gradient_solve import (
    LayerProblem, LayerSolution, fused_weight, lift, solve_layer, stacked_down, stage_of, subspace_problem,
)

if TYPE_CHECKING:
    from lorakit.fusion.gradient import Concept, GradientSettings


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
    """One capture forward pass: ``prompts`` (with one seed each) of concept ``concept``. ``splits`` says, per
    prompt, whose statistics its rows feed: ``fit`` or ``val`` (held-out statistics for ``ridge="auto"``); fit and
    held-out prompts of a concept share passes. ``split``: ``fit``, ``val``, or ``mixed`` when the pass has both."""

    concept: int
    prompts: list[str]
    seeds: list[int]
    split: str = "fit"
    splits: list[str] | None = None

    def __post_init__(self):
        if self.splits is None:
            self.splits = [self.split] * len(self.prompts)
        kinds = set(self.splits)
        self.split = kinds.pop() if len(kinds) == 1 else "mixed"

    def batch_rows(self, split: str) -> torch.Tensor | slice | None:
        """The prompts of ``split`` in this pass: None (all of them), a ``slice`` of the batch when they are
        consecutive (the usual case: fit prompts first), else a ``[B]`` bool mask."""
        hits = [k for k, s in enumerate(self.splits) if s == split]
        if len(hits) == len(self.splits):
            return None
        if hits and hits[-1] - hits[0] + 1 == len(hits):
            return slice(hits[0], hits[-1] + 1)
        return torch.tensor([s == split for s in self.splits])


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
    large = {p.key for p in stage_probs if p.is_conv and p.in_dim > settings.max_conv_dim}
    fallback = {}
    if settings.large_convs == "average":
        fallback = {k: f"conv in*kh*kw = {probs[k].in_dim} > max_conv_dim {settings.max_conv_dim}" for k in large}
    subspace = large - set(fallback)
    splits = sorted({sp for it in items for sp in it.splits})
    collectors = _collectors(pipe, [p for p in stage_probs if p.key not in fallback], splits, settings,
                             gram=solver is None, subspace=subspace)
    weights = ConceptWeights(pipe, switch, base) if switch else None
    _capture(collectors, _my_items(items), run_item, weights, rows_for, f"fuse: {stage} capture", settings.progress)
    t_capture = time.perf_counter() - t0
    t1 = time.perf_counter()
    solutions = _solve_stage(pipe, stage, stage_probs, collectors, fallback, len(concepts), settings, solver,
                             subspace)
    if fallback:
        warnings.warn(
            f"gradient fusion: {len(fallback)} conv layer(s) use the weighted average instead of the solve "
            f"(raise --max-conv-dim, or large_convs='subspace', to solve them): {', '.join(sorted(fallback)[:5])}"
            + (" ..." if len(fallback) > 5 else ""),
            stacklevel=2,
        )
    report = {
        "layers": len(stage_probs),
        "solved": len(stage_probs) - len(fallback),
        "fallback_layers": sorted(fallback),
        "subspace_layers": sorted(subspace),
        "work_items": len(items),
        "forward_passes": {sp: sum(1 for it in items if sp in it.splits) for sp in splits},
        "capture_s": round(t_capture, 3),
        "solve_s": round(time.perf_counter() - t1, 3),
        "total_s": round(time.perf_counter() - t0, 3),
    }
    if settings.keep_inputs:
        report["collectors"] = collectors["fit"]
        if "val" in collectors:
            report["val_collectors"] = collectors["val"]
    return solutions, report


def _collectors(pipe, solve_probs: list[LayerProblem], splits: list[str], settings: GradientSettings,
                gram: bool, subspace: set[str] = frozenset()) -> dict[str, dict[str, GramCollector]]:
    """``{split: {component: GramCollector}}`` over the layers to solve; ``subspace`` layers record their inputs
    seen through the LoRA down matrices (:func:`subspace_problem`)."""
    collectors: dict[str, dict[str, GramCollector]] = {sp: {} for sp in splits}
    for comp in sorted({p.component for p in solve_probs}):
        mine = [p for p in solve_probs if p.component == comp]
        layers = {p.key: (p.path, subspace_problem(p).downs if p.key in subspace else p.downs) for p in mine}
        project = {p.key: stacked_down(p) for p in mine if p.key in subspace}
        for sp in splits:
            collectors[sp][comp] = GramCollector(getattr(pipe, comp), layers, keep_inputs=settings.keep_inputs,
                                                 gram=gram, project=project)
    return collectors


def _capture(collectors: dict[str, dict[str, GramCollector]], mine: list[WorkItem], run_item,
             weights: ConceptWeights | None, rows_for, desc: str, progress: bool) -> None:
    """Run this process's work items with the hooks in place (each item's concept weights and token rows, its
    split's collectors), then sum the statistics over processes."""
    every = [c for per in collectors.values() for c in per.values()]
    for c in every:
        c.__enter__()
    try:
        with torch.no_grad():
            for item in _progress(mine, desc, progress):
                if weights is not None:
                    weights.set(item.concept)
                for sp, per in collectors.items():
                    _point(per, item, sp, rows_for)
                run_item(item)
    finally:
        for c in every:
            c.__exit__(None, None, None)
        if weights is not None:
            weights.restore()
    for c in every:
        c.reduce()


def _point(per: dict[str, GramCollector], item: WorkItem, split: str, rows_for) -> None:
    """Point one split's collectors at ``item``: its concept, and the rows of its prompts of that split (token rows
    ``[B, S]`` for text-side layers, prompts ``[B]`` otherwise); a pass without such prompts records nothing."""
    batch = item.batch_rows(split)
    active = split in item.splits
    for comp, c in per.items():
        c.concept = item.concept if active else None
        rows = rows_for(item, comp) if rows_for is not None and active else None
        if rows is not None and batch is not None:
            keep = torch.zeros(len(item.prompts), dtype=torch.bool)
            keep[batch] = True
            rows = rows & keep[:, None]
        c.rows = rows if rows is not None else (batch if active else None)
        c.batch = len(item.prompts)


def _solve_stage(pipe, stage: str, stage_probs: list[LayerProblem], collectors: dict, fallback: dict[str, str],
                 n_concepts: int, settings: GradientSettings, solver,
                 subspace: set[str] = frozenset()) -> dict[str, LayerSolution]:
    """Solve every layer of the stage (``fallback`` layers: the weighted average; ``subspace`` layers in their
    LoRA subspace) and write ``W*`` in place."""
    solutions: dict[str, LayerSolution] = {}
    for p in _progress(stage_probs, f"fuse: {stage} solve", settings.progress):
        if p.key in fallback:
            dev = getattr(pipe, p.component).get_submodule(p.path).weight.device
            zeros_G = torch.zeros(0, 0, dtype=torch.float64, device=dev)
            sol = solve_layer(zeros_G, {i: torch.zeros(0) for i in p.ups}, p, n_concepts, settings.ridge,
                              fallback=fallback[p.key])
        elif solver is not None:
            sol = solver(p, collectors["fit"][p.component].stats[p.key], n_concepts)
        else:
            st = collectors["fit"][p.component].stats[p.key]
            vst = collectors["val"][p.component].stats[p.key] if "val" in collectors else None
            val = (vst.G, vst.P) if vst is not None and settings.ridge == "auto" else None
            sub = subspace_problem(p) if p.key in subspace else p
            sol = solve_layer(st.G, st.P, sub, n_concepts, settings.ridge, ridge_target=settings.ridge_target,
                              val=val)
            if sub is not p:
                sol = lift(sol, p)
            sol.report["tokens"] = int(st.tokens.item())
            if vst is not None:
                sol.report["heldout_tokens"] = int(vst.tokens.item())
        solutions[p.key] = sol
        module = getattr(pipe, p.component).get_submodule(p.path)
        with torch.no_grad():
            module.weight.copy_(fused_weight(module.weight.detach(), sol))
    return solutions


def _call_pipe(pipe, prompts: list[str], seeds: list[int], steps: int, size: int | None, guidance: float):
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    kwargs = dict(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                  generator=gens)
    if size is not None:
        kwargs.update(height=size, width=size)
    return pipe(**kwargs)


def _batched(concept: int, triples: list[tuple[str, int, str]], batch: int) -> list[WorkItem]:
    """``(prompt, seed, split)`` triples of one concept in forward passes of at most ``batch``."""
    batch = max(1, int(batch))
    return [WorkItem(concept, [p for p, _, _ in chunk], [s for _, s, _ in chunk], splits=[sp for _, _, sp in chunk])
            for chunk in (triples[k : k + batch] for k in range(0, len(triples), batch))]


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
        items += _batched(i, [(p, sd, "fit") for p, sd in fit] + [(p, sd, "val") for p, sd in val], settings.batch)
    return items
