"""The capture stages of gradient fusion (:mod:`lorakit.fusion.gradient`): forward passes with each concept's
weights, Gram statistics gathered by hooks (:mod:`lorakit.fusion.capture`), reduced across processes, then every
layer of the stage solved (:mod:`lorakit.fusion.gradient_solve`) and written in place."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lorakit.fusion.capture import GramCollector, concept_runs
from lorakit.fusion.gradient_solve import (
    LayerProblem, LayerSolution, fused_weight, lift, solve_layer, stacked_down, stage_of, subspace_problem,
)
from lorakit.logs import tqdm

if TYPE_CHECKING:
    from lorakit.fusion.gradient import Concept, GradientSettings


# ------------------------------------------------------------------------------------------------ stages


class ConceptWeights:
    """Run layers as each prompt's concept's ``W0 + a_i dW_i`` (W0 for layers a concept does not adapt); restore
    them afterwards.

    A batch of one concept gets its weights written into the layers; a batch that mixes concepts runs the layers
    at ``W0`` and adds each prompt's ``a_i dW_i x = U_i (D_i x)`` by forward hooks (as a LoRA would), so one
    forward pass serves every concept.

    Args:
        probs: the layers to switch.
        base: ``{key: W0}`` base weights (default: the layers' current weights).
    """

    def __init__(self, pipe, probs: list[LayerProblem], base: dict[str, torch.Tensor] | None = None):
        self.probs = probs
        self.modules = {p.key: getattr(pipe, p.component).get_submodule(p.path) for p in probs}
        self.saved = {k: m.weight.detach().clone() for k, m in self.modules.items()}
        self.base = {k: (base[k] if base is not None else self.saved[k]) for k in self.modules}
        self.current: object = None
        self.owners: list[int] | None = None  # concept per prompt while a mixed batch runs
        self._handles = []

    @torch.no_grad()
    def _write(self, concept: int | None, restore: bool = False) -> None:
        for p in self.probs:
            w = self.modules[p.key].weight
            if restore:
                w.copy_(self.saved[p.key])
            elif concept in p.ups:
                delta = (p.ups[concept] @ p.downs[concept]).reshape(w.shape)
                w.copy_((self.base[p.key].to(torch.float64) + delta.to(w.device)).to(w.dtype))
            else:
                w.copy_(self.base[p.key])

    def set(self, concepts: int | list[int] | None) -> None:
        """The weights of ``concepts`` (one concept, or one per prompt of the batch); ``None`` restores the weights
        found at construction."""
        if isinstance(concepts, list) and len(set(concepts)) == 1:
            concepts = concepts[0]
        key = tuple(concepts) if isinstance(concepts, list) else concepts
        if key == self.current:
            return
        if isinstance(concepts, list):
            if not isinstance(self.current, tuple):
                self._write(None)  # W0 everywhere; the hooks add each prompt's delta
                self._hook_all()
            self.owners = list(concepts)
        else:
            self.owners = None
            self._write(concepts, restore=concepts is None)
            if concepts is None:
                self._unhook_all()
        self.current = key

    def restore(self) -> None:
        self.set(None)

    def _hook_all(self) -> None:
        if self._handles:
            return
        for p in self.probs:
            mod = self.modules[p.key]
            order = sorted(p.ups)
            up = torch.cat([p.ups[c] for c in order], 1).to(mod.weight.device, mod.weight.dtype)  # [out, R]
            down = torch.cat([p.downs[c] for c in order], 0).to(mod.weight.device, mod.weight.dtype)  # [R, in]
            if p.is_conv:
                up, down = up[:, :, None, None], down.reshape(down.shape[0], *p.shape[1:])
            blocks, k = {}, 0
            for c in order:
                blocks[c] = (k, k + p.ups[c].shape[1])
                k += p.ups[c].shape[1]
            self._handles.append(mod.register_forward_hook(self._delta_hook(up, down, blocks)))

    def _unhook_all(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _delta_hook(self, up: torch.Tensor, down: torch.Tensor, blocks: dict[int, tuple[int, int]]):
        """``out += U ((D x) * m)`` with every concept's factors stacked (``U [out, R]``, ``D [R, in]``) and ``m``
        keeping, for each prompt's rows, the rank block of that prompt's concept: two products per call whatever
        the number of concepts."""
        masks: dict[int, torch.Tensor] = {}
        seen = [None]

        def mask_of(n: int) -> torch.Tensor:  # [n, R]: the k copies of the batch are copy-major (concept_runs)
            if seen[0] is not self.owners:
                masks.clear()
                seen[0] = self.owners
            if n not in masks:
                m = torch.zeros(n, up.shape[1], dtype=up.dtype, device=up.device)
                for c, start, stop in concept_runs(self.owners, n):
                    if c in blocks:
                        m[start:stop, blocks[c][0] : blocks[c][1]] = 1
                masks[n] = m
            return masks[n]

        def hook(module, args, out):
            if self.owners is None:
                return None
            x = args[0]
            m = mask_of(x.shape[0])
            if isinstance(module, torch.nn.Conv2d):
                z = F.conv2d(x, down, None, module.stride, module.padding, module.dilation)
                out += F.conv2d(z * m[:, :, None, None], up)
            else:  # out += ((x D^T) * m) U^T in place
                z = x @ down.T
                z *= m.view(m.shape[0], *([1] * (x.dim() - 2)), m.shape[1])
                out.view(-1, out.shape[-1]).addmm_(z.view(-1, z.shape[-1]), up.T)
            return out

        return hook


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

    return tqdm(iterable, desc=desc, total=total, disable=not (enabled and PartialState().is_main_process),
                leave=False, dynamic_ncols=True)


def _min_resolution(pipe) -> int:
    """Smallest image size the UNet accepts (latent divisible by its total downsampling)."""
    n_down = len(pipe.unet.config.down_block_types) - 1
    return int(pipe.vae_scale_factor) * (2**n_down)


@dataclass
class WorkItem:
    """One capture forward pass: ``prompts`` (with one seed each); ``owners`` says, per prompt, whose concept it
    is (one pass may hold several concepts: :class:`ConceptWeights` runs each prompt with its own concept's
    weights) and ``splits`` whose statistics its rows feed: ``fit`` or ``val`` (held-out statistics for
    ``ridge="auto"``). ``split``: ``fit``, ``val``, or ``mixed`` when the pass has both."""

    owners: list[int]
    prompts: list[str]
    seeds: list[int]
    splits: list[str] | None = None

    def __post_init__(self):
        if self.splits is None:
            self.splits = ["fit"] * len(self.prompts)

    @property
    def split(self) -> str:
        kinds = set(self.splits)
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def concepts(self) -> list[int]:
        """The concepts in this pass, in order."""
        return sorted(set(self.owners))

    def owners_of(self, split: str) -> list[int] | None:
        """The concept of each prompt of ``split`` (-1 for the others); None when the pass has none."""
        if split not in self.splits:
            return None
        return [o if s == split else -1 for o, s in zip(self.owners, self.splits)]


def run_stage(pipe, stage: str, probs: dict[str, LayerProblem], concepts: list[Concept], settings: GradientSettings,
              items: list[WorkItem], run_item, switch: list[LayerProblem] | None = None,
              base: dict[str, torch.Tensor] | None = None, rows_for=None,
              solver=None) -> tuple[dict[str, LayerSolution], dict]:
    """Capture statistics for one stage, reduce them across processes, solve every layer, write W* in place.

    Args:
        items: the forward passes, in a fixed global order; ``run_item(item)`` runs one.
        switch: layers set to each concept's own weights (``base`` + its delta) while its items run.
        rows_for: ``rows_for(item, component, split)`` -> ``[B, S]`` token-row mask for that component's layers in
            that split's statistics (or None).
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
        for sp in splits:  # the first split's hooks record every split
            collectors[sp][comp] = GramCollector(getattr(pipe, comp), layers, keep_inputs=settings.keep_inputs,
                                                 gram=gram, project=project,
                                                 follow=collectors[splits[0]][comp] if sp != splits[0] else None)
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
                    weights.set(list(item.owners))
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
    """Point one split's collectors at ``item``: the concept of each of its prompts of that split, and their token
    rows ``[B, S]`` for text-side layers; a pass without such prompts records nothing."""
    owners = item.owners_of(split)
    for comp, c in per.items():
        c.concept = None
        c.owners = owners
        c.rows = rows_for(item, comp, split) if rows_for is not None and owners is not None else None
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
            rows = int(st.tokens.item()) + (int(vst.tokens.item()) if val is not None else 0)  # bounds G's rank
            sol = solve_layer(st.G, st.P, sub, n_concepts, settings.ridge, ridge_target=settings.ridge_target,
                              val=val, rows=rows)
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


def _batched(triples: list[tuple[int, str, int, str]], batch: int) -> list[WorkItem]:
    """``(concept, prompt, seed, split)`` in forward passes of at most ``batch`` prompts."""
    batch = max(1, int(batch))
    return [WorkItem([c for c, _, _, _ in chunk], [p for _, p, _, _ in chunk], [s for _, _, s, _ in chunk],
                     splits=[sp for _, _, _, sp in chunk])
            for chunk in (triples[k : k + batch] for k in range(0, len(triples), batch))]


def work_items(concepts: list[Concept], settings: GradientSettings, kind: str) -> list[WorkItem]:
    """The capture passes of the text-side stages (``kind="text"``: each concept's prompts) or of the UNet stage
    (``kind="unet"``: sample prompts x ``samples`` seeds). With ``ridge="auto"`` they include the held-out passes:
    ``val_prompts``, and for the UNet ``val_sample_prompts`` (else the sample prompts) x ``val_samples`` other
    seeds. Every concept's prompts share passes of up to ``settings.batch`` prompts."""
    triples = []
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
        triples += [(i, p, sd, "fit") for p, sd in fit] + [(i, p, sd, "val") for p, sd in val]
    if not settings.share_passes:
        return [it for i in range(len(concepts)) for it in _batched([t for t in triples if t[0] == i], settings.batch)]
    return _batched(triples, settings.batch)
