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

    def relative_many(self, Es: torch.Tensor) -> list[float | None]:
        """:meth:`relative` of each ``Es[k]`` (``[g, R, in]``), in a few batched products."""
        if self.K <= 0:
            return [None] * Es.shape[0]
        quad = (self.UtU * (Es @ self.G @ Es.transpose(1, 2))).sum((1, 2))
        lin = (self.UtU * (Es @ self.Pst.T)).sum((1, 2))
        return [max(float(v), 0.0) / self.K for v in (quad - 2 * lin + self.K)]


def _check_finite(key: str, G: torch.Tensor, P: dict) -> None:
    if not bool(torch.isfinite(G).all()) or not all(bool(torch.isfinite(p).all()) for p in P.values()):
        raise ValueError(f"gradient fusion: the activations recorded at layer {key} contain NaN or inf "
                         "(check the base model, the adapters and --dtype)")


def _ridge_solve(G, rhs_base, target, rel: float, key: str, dim: int | None = None) -> tuple[torch.Tensor, float]:
    """``(rhs_base + lam target) (G + lam I)^-1`` by Cholesky, ``lam = rel * trace(G) / dim`` (``dim``: the layer's
    input size, default ``G``'s); ``target`` for ``rel = inf``. Raises ValueError naming the layer when the system
    is singular."""
    if rel == float("inf"):
        return target.clone(), float("inf")
    n = G.shape[0]
    lam = rel * float(G.diagonal().sum()) / (dim or n)
    L, info = torch.linalg.cholesky_ex(G + lam * torch.eye(n, dtype=G.dtype, device=G.device))
    if int(info.item()) != 0:
        raise ValueError(f"gradient fusion: layer {key}: the least-squares system is singular at ridge {rel:g} "
                         "(few or repeated activations); use --ridge auto or a larger --ridge")
    return torch.cholesky_solve((rhs_base + lam * target).T, L).T, lam


def _ridge_path(G, Pst, target, rels, key: str, dim: int | None = None) -> list[tuple[float, torch.Tensor]]:
    """The ridge solutions for every relative ridge in ``rels`` from one eigendecomposition of ``G`` (``dim`` as
    in :func:`_ridge_solve`). Raises ValueError naming the layer when the decomposition fails."""
    scale = float(G.diagonal().sum()) / (dim or G.shape[0])
    try:
        s, Q = torch.linalg.eigh(G)
    except torch.linalg.LinAlgError as err:
        raise ValueError(f"gradient fusion: layer {key}: the eigendecomposition of its Gram matrix failed "
                         f"({err}); use a larger --ridge") from None
    s = s.clamp(min=0)
    PQ, TQ = Pst @ Q, target @ Q
    finite = [rel for rel in rels if rel != float("inf")]
    lam = torch.tensor(finite, dtype=G.dtype, device=G.device)[:, None, None] * scale
    path = dict(zip(finite, ((PQ + lam * TQ) / (s + lam)) @ Q.T))  # [g, R, in] in two batched products
    return [(rel, target.clone() if rel == float("inf") else path[rel]) for rel in rels]


def solve_layer(G: torch.Tensor, P: dict[int, torch.Tensor], prob: LayerProblem, n_concepts: int,
                ridge: float | str, fallback: str | None = None, ridge_target: str = "base",
                val: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None,
                grid: tuple[float, ...] = RIDGE_GRID, rows: int | None = None,
                dim: int | None = None) -> LayerSolution:
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
        rows: how many activation rows ``G`` (plus ``val``'s Gram) sums, when known: their rank is at most that,
            and a layer with far fewer rows than inputs is solved exactly within the range of its Gram matrices
            (:func:`gram_range`), at a cost growing with ``rows`` instead of ``in^3``.
        dim: the input size the relative ridge is scaled by (default ``G``'s; set for a problem in reduced inputs).
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
    reduced = _solve_in_gram_range(G, P, prob, n_concepts, ridge, ridge_target, val, grid, rows)
    if reduced is not None:
        return reduced
    target = Dw if ridge_target == "average" else torch.zeros_like(D)
    rel, G_all, P_all = _choose_ridge(ridge, G, P, val, U, Dw, prob, order, target, grid, report, dim)
    M, lam = _ridge_solve(G_all, torch.cat([P_all[i] for i in order], 0), target, rel, prob.key, dim)
    fit = _Objective(U, prob, order, G_all, P_all)
    inf = rel == float("inf")  # JSON has no infinity: the ridge target itself is reported as "inf"
    report.update(method="closed_form", ridge="inf" if inf else rel, ridge_lambda=None if inf else lam,
                  residual=fit.relative(M),
                  weighted_residual=fit.relative(Dw))
    return LayerSolution(up=U, down=M, report=report)


# A layer is solved in the range of its Gram matrices when their rows are at most this share of its inputs (with
# the held-out ridge path; a fixed ridge's one Cholesky is cheaper, so there the share is smaller).
RANGE_SHARE_AUTO, RANGE_SHARE_FIXED = 0.5, 0.125
# The share of trace(G) the range may miss before the layer is solved on its full input instead.
RANGE_LOST_TRACE = 1e-10


def gram_range(G: torch.Tensor, rows: int) -> torch.Tensor:
    """An orthonormal basis ``[in, rows]`` of the range of a Gram matrix of at most ``rows`` activation rows
    (its rank is at most ``rows``): ``G`` times a seeded Gaussian sketch, orthonormalised."""
    gen = torch.Generator(device=G.device).manual_seed(0)
    sketch = torch.randn(G.shape[0], rows, generator=gen, dtype=G.dtype, device=G.device)
    return torch.linalg.qr(G @ sketch).Q


def _solve_in_gram_range(G, P, prob: LayerProblem, n_concepts: int, ridge, ridge_target: str, val, grid,
                         rows: int | None) -> LayerSolution | None:
    """The layer's solution from the same problem restricted to the range ``Q`` of ``G`` (+ held-out Gram), or
    None when that does not pay (too many rows) or ``Q`` misses part of ``G``.

    Exact: every ``G_i``, ``P_i = D_i G_i`` and held-out statistic lives in ``range(Q)``, so with ``x = Q z + y``
    (``y`` orthogonal), ``(P + lam T)(G + lam I)^-1 = (P Q + lam T Q)(Q^T G Q + lam I)^-1 Q^T + T (I - Q Q^T)``:
    the ridge problem of the ``rows``-dimensional inputs ``z`` (same objective, same held-out scores, same chosen
    ridge), lifted back with the ridge target ``T`` where no activation reaches."""
    auto = ridge == "auto" and val is not None
    if rows is None or ridge == 0 or (ridge == "auto" and not auto):
        return None
    n = G.shape[0]
    if not 0 < rows <= n * (RANGE_SHARE_AUTO if auto else RANGE_SHARE_FIXED):
        return None
    G_all = G + val[0] if auto else G
    Q = gram_range(G_all, int(rows))
    proj = lambda M: M @ Q  # noqa: E731
    G_r = Q.T @ G @ Q
    val_r = (Q.T @ val[0] @ Q, {i: proj(p) for i, p in val[1].items()}) if auto else None
    kept = float(G_r.diagonal().sum()) + (float(val_r[0].diagonal().sum()) if auto else 0.0)
    total = float(G_all.diagonal().sum())
    if total - kept > RANGE_LOST_TRACE * total:
        return None
    order = sorted(prob.downs)
    sub = LayerProblem(prob.key, prob.component, prob.path, (prob.shape[0], Q.shape[1]), ups=prob.ups,
                       downs={i: proj(prob.downs[i].to(G.device)) for i in order})
    sol = solve_layer(G_r, {i: proj(P[i]) for i in order}, sub, n_concepts, ridge, ridge_target=ridge_target,
                      val=val_r, grid=grid, dim=n)
    D = torch.cat([prob.downs[i] for i in order], 0).to(G.device)
    target = D / n_concepts if ridge_target == "average" else torch.zeros_like(D)
    down = sol.down @ Q.T + target - (target @ Q) @ Q.T  # the target where no activation reaches
    lam = sol.report.get("ridge_lambda")
    if lam:  # one step of refinement on the full statistics (Q is accurate to ~eps * |G| / s in a direction of G's
        # eigenvalue s; the step brings the solution to the full Cholesky solve's accuracy)
        heldout = sol.report.get("ridge_source") == "held-out"
        Gf, Gf_r = (G + val[0], G_r + val_r[0]) if heldout else (G, G_r)
        rhs = torch.cat([P[i] + val[1][i] if heldout else P[i] for i in order], 0) + lam * target
        L = torch.linalg.cholesky(Gf_r + lam * torch.eye(Q.shape[1], dtype=G.dtype, device=G.device))
        res = rhs - down @ Gf - lam * down
        res_q = res @ Q
        down = down + torch.cholesky_solve(res_q.T, L).T @ Q.T + (res - res_q @ Q.T) / lam
    sol.report.update(in_dim=prob.in_dim, range_dim=int(Q.shape[1]))
    return LayerSolution(up=sol.up, down=down, report=sol.report)


def _choose_ridge(ridge, G, P, val, U, Dw, prob: LayerProblem, order, target, grid, report: dict, dim=None):
    """The relative ridge of one layer and the statistics to solve with: ``"auto"`` with held-out statistics
    scores every ridge of ``grid`` fitted on ``(G, P)`` on ``val`` and returns the best with fit + held-out
    statistics; else the given ridge (or ``RIDGE_WITHOUT_HELDOUT``) with ``(G, P)``. Adds to ``report``."""
    if ridge == "auto" and val is not None and float(val[0].diagonal().sum()) > 0:
        held = _Objective(U, prob, order, *val)
        Pst = torch.cat([P[i] for i in order], 0)
        path = _ridge_path(G, Pst, target, grid, prob.key, dim)
        scores = list(zip(held.relative_many(torch.stack([E for _, E in path])), [rel for rel, _ in path]))
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
