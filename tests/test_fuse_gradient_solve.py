"""Gradient fusion's per-layer solve: the exact reduction to the range of a layer's Gram matrices gives the same
chosen ridge, held-out scores and fused delta as the full-input solve."""

import pytest
import torch

from lorakit.fusion.gradient_solve import LayerProblem, solve_layer


def _layer(seed: int, n: int = 128, out: int = 24, r: int = 3, dims: int = 20, decay: float = 4.0):
    """Two concepts' LoRA factors and fit / held-out statistics of activations in a ``dims``-dimensional subspace of
    the ``n`` inputs (15 fit and 10 held-out rows per concept), with a spread of scales along it."""
    g = torch.Generator().manual_seed(seed)
    prob = LayerProblem("unet.x.to_q", "unet", "x", (out, n),
                        ups={i: torch.randn(out, r, generator=g, dtype=torch.float64) for i in range(2)},
                        downs={i: torch.randn(r, n, generator=g, dtype=torch.float64) for i in range(2)})
    basis = torch.linalg.qr(torch.randn(n, dims, generator=g, dtype=torch.float64)).Q.T
    scales = torch.logspace(0, -decay, dims, dtype=torch.float64)

    def rows(m, i):
        return (torch.randn(m, dims, generator=g, dtype=torch.float64) * scales + i) @ basis

    fit, held = {i: rows(15, i) for i in range(2)}, {i: rows(10, i) for i in range(2)}

    def stats(xs):
        return sum(x.T @ x for x in xs.values()), {i: prob.downs[i] @ (xs[i].T @ xs[i]) for i in xs}

    return prob, stats(fit), stats(held), 50, (fit, held)


def _delta(sol):
    return sol.up @ sol.down


def _exact(prob, xs: dict, lam: float, n_concepts: int = 2) -> torch.Tensor:
    """The ridge solution's delta ``U E`` from the raw rows, by QR of the stacked least-squares system
    ``[X; sqrt(lam) I] E^T = [targets; sqrt(lam) T^T]`` (T the weighted average): accurate to ~eps * sqrt(cond),
    where any solve from Gram matrices has ~eps * cond."""
    order = sorted(prob.downs)
    n = prob.in_dim
    X = torch.cat([xs[i] for i in order])
    blocks = []
    for i in order:  # concept i's rows target D_i x, the other concepts' rows nothing (in concept i's block)
        blocks.append(torch.cat([xs[j] @ prob.downs[i].T if j == i else torch.zeros(len(xs[j]), prob.downs[i].shape[0],
                                 dtype=torch.float64) for j in order]))
    D = torch.cat([prob.downs[i] for i in order])
    A = torch.cat([X, lam**0.5 * torch.eye(n, dtype=torch.float64)])
    B = torch.cat([torch.cat(blocks, 1), lam**0.5 * (D / n_concepts).T])
    Qa, Ra = torch.linalg.qr(A)
    E = torch.linalg.solve_triangular(Ra, Qa.T @ B, upper=True).T
    return torch.cat([prob.ups[i] for i in order], 1) @ E


def _error(sol, exact) -> float:
    return float((_delta(sol) - exact).abs().max() / exact.abs().max())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("target", ["average", "base"])
def test_auto_ridge_in_the_gram_range_equals_the_full_solve(seed, target):
    prob, (G, P), val, rows, _ = _layer(seed)
    full = solve_layer(G, P, prob, 2, "auto", ridge_target=target, val=val)
    red = solve_layer(G, P, prob, 2, "auto", ridge_target=target, val=val, rows=rows)
    assert "range_dim" not in full.report and red.report["range_dim"] == rows
    assert red.report["ridge"] == full.report["ridge"]
    for k, v in full.report["heldout_grid"].items():
        assert red.report["heldout_grid"][k] == pytest.approx(v, rel=1e-8, abs=1e-8), k
    for k in ("heldout_residual", "residual", "weighted_residual", "heldout_weighted_residual", "ridge_lambda"):
        assert red.report[k] == pytest.approx(full.report[k], rel=1e-9), k
    torch.testing.assert_close(_delta(red), _delta(full), rtol=0, atol=1e-9 * float(_delta(full).abs().max()))


def test_small_ridge_chosen_and_as_accurate_as_the_full_solve():
    """A layer whose held-out rows are its fit rows picks the smallest ridge, where the solve from Gram matrices is
    least accurate: the reduced solve is as close to the exact solution (from the raw rows) as the full one."""
    prob, (G, P), _, rows, (fit, _) = _layer(3, decay=1.0)
    val = (G.clone(), {i: p.clone() for i, p in P.items()})
    full = solve_layer(G, P, prob, 2, "auto", ridge_target="average", val=val)
    red = solve_layer(G, P, prob, 2, "auto", ridge_target="average", val=val, rows=rows)
    assert float(full.report["ridge"]) <= 1e-5 and red.report["ridge"] == full.report["ridge"]
    both = {i: torch.cat([fit[i], fit[i]]) for i in fit}  # fit + held-out rows: the final solve's statistics
    exact = _exact(prob, both, full.report["ridge_lambda"])
    assert _error(red, exact) <= max(2 * _error(full, exact), 1e-12), (_error(red, exact), _error(full, exact))


@pytest.mark.parametrize("rel", [1e-6, 1e-3, 0.1])
def test_fixed_ridge_reduced_only_where_rows_are_few_and_the_range_is_whole(rel):
    prob, (G, P), _, _, (fit, _) = _layer(4, n=256)
    full = solve_layer(G, P, prob, 2, rel, ridge_target="average")
    red = solve_layer(G, P, prob, 2, rel, ridge_target="average", rows=30)  # 30 fit rows, rank 20
    assert red.report["range_dim"] == 30 and red.report["ridge_lambda"] == pytest.approx(full.report["ridge_lambda"])
    exact = _exact(prob, fit, full.report["ridge_lambda"])
    assert _error(red, exact) <= max(2 * _error(full, exact), 1e-12), (_error(red, exact), _error(full, exact))
    # a row count below the true rank: the sketch misses part of G, so the layer is solved on its full input
    under = solve_layer(G, P, prob, 2, rel, ridge_target="average", rows=10)
    assert "range_dim" not in under.report
    torch.testing.assert_close(_delta(under), _delta(full))
    # too many rows for the reduction to pay: the full solve
    assert "range_dim" not in solve_layer(G, P, prob, 2, rel, rows=200).report
