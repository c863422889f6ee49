"""The per-layer closed-form solve of gradient fusion (:mod:`lorakit.fusion.gradient`): ridge least squares from
activation statistics, the ridge chosen on held-out statistics, and the fused delta as an exact LoRA."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorakit.adapters.io import LoraModule

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


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



def stage_of(key: str) -> str:
    """Which stage fuses an adapter key: ``text_encoder``, ``cross_kv`` or ``unet``."""
    comp, path = key.split(".", 1)
    if comp in TEXT_COMPONENTS:
        return "text_encoder"
    if comp == "unet" and path.endswith(("attn2.to_k", "attn2.to_v")):
        return "cross_kv"
    return "unet"



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


def _ridge_path(G, Pst, target, rels, key: str) -> list[tuple[float, torch.Tensor]]:
    """The ridge solutions for every relative ridge in ``rels`` from one eigendecomposition of ``G``.
    Raises ValueError naming the layer when the decomposition fails."""
    n = G.shape[0]
    scale = float(G.diagonal().sum()) / n
    try:
        s, Q = torch.linalg.eigh(G)
    except torch.linalg.LinAlgError as err:
        raise ValueError(f"gradient fusion: layer {key}: the eigendecomposition of its Gram matrix failed "
                         f"({err}); use a larger --ridge") from None
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
    rel, G_all, P_all = _choose_ridge(ridge, G, P, val, U, Dw, prob, order, target, grid, report)
    M, lam = _ridge_solve(G_all, torch.cat([P_all[i] for i in order], 0), target, rel, prob.key)
    fit = _Objective(U, prob, order, G_all, P_all)
    inf = rel == float("inf")  # JSON has no infinity: the ridge target itself is reported as "inf"
    report.update(method="closed_form", ridge="inf" if inf else rel, ridge_lambda=None if inf else lam,
                  residual=fit.relative(M),
                  weighted_residual=fit.relative(Dw))
    return LayerSolution(up=U, down=M, report=report)


def _choose_ridge(ridge, G, P, val, U, Dw, prob: LayerProblem, order, target, grid, report: dict):
    """The relative ridge of one layer and the statistics to solve with: ``"auto"`` with held-out statistics
    scores every ridge of ``grid`` fitted on ``(G, P)`` on ``val`` and returns the best with fit + held-out
    statistics; else the given ridge (or ``RIDGE_WITHOUT_HELDOUT``) with ``(G, P)``. Adds to ``report``."""
    if ridge == "auto" and val is not None and float(val[0].diagonal().sum()) > 0:
        held = _Objective(U, prob, order, *val)
        Pst = torch.cat([P[i] for i in order], 0)
        scores = [(held.relative(E), rel) for rel, E in _ridge_path(G, Pst, target, grid, prob.key)]
        best = min(scores, key=lambda t: (t[0] if t[0] is not None else float("inf"), -t[1]))
        report.update(ridge_source="held-out", heldout_residual=best[0], heldout_weighted_residual=held.relative(Dw),
                      heldout_grid={f"{r:g}": v for v, r in scores})
        return best[1], G + val[0], {i: P[i] + val[1][i] for i in order}
    if ridge == "auto":
        report["ridge_source"] = "no held-out data"
        return RIDGE_WITHOUT_HELDOUT, G, P
    report["ridge_source"] = "given"
    return float(ridge), G, P


def stacked_down(prob: LayerProblem) -> torch.Tensor:
    """``D = [D_i; ...]`` ``[R, in_flat]``, concepts in order: the basis of a layer's LoRA subspace."""
    return torch.cat([prob.downs[i] for i in sorted(prob.downs)], 0)


def subspace_problem(prob: LayerProblem) -> LayerProblem:
    """The layer's problem restricted to its LoRA subspace, ``W = W0 + U C D`` (``C [R, R]``): the inputs are
    ``z = D x`` (``R`` numbers), concept i's LoRA reads ``z`` through rows of the identity. Its Gram matrix is
    ``[R, R]`` whatever the layer's size (large convs); :func:`lift` maps its solution back."""
    order = sorted(prob.downs)
    R = sum(prob.downs[i].shape[0] for i in order)
    eye = torch.eye(R, dtype=torch.float64)
    downs, k = {}, 0
    for i in order:
        r = prob.downs[i].shape[0]
        downs[i] = eye[k : k + r]
        k += r
    return LayerProblem(prob.key, prob.component, prob.path, (prob.shape[0], R), ups=prob.ups, downs=downs)


def lift(sol: LayerSolution, prob: LayerProblem) -> LayerSolution:
    """A :func:`subspace_problem` solution as a solution of ``prob``: ``down = C @ D``."""
    D = stacked_down(prob).to(sol.down.device)
    R = D.shape[0]
    sol.report.update(in_dim=prob.in_dim, space=f"LoRA subspace (dim {R})")
    return LayerSolution(up=sol.up, down=sol.down @ D, report=sol.report)


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
