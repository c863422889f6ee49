"""The Mix-of-Show reference's per-layer solver (LBFGS on stored activations), for tests and tools/bench_fuse.py.

Re-implemented from the description of the reference's ``update_quasi_newton``: start at W0, minimise
``mse(X W^T, Y)`` with ``torch.optim.LBFGS(lr=1, max_iter=iters, history_size=25, line_search_fn="strong_wolfe",
tolerance_grad=1e-16, tolerance_change=1e-16)`` in float32, keep the best W seen. The reference runs 500
iterations for text-encoder and cross-attention to_k/to_v layers and 50 for the other UNet layers.
Unlike lorakit's closed form it needs every activation X (and target Y) in memory.

Not part of the product: lorakit never imports this file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REFERENCE_ITERS = {"text_encoder": 500, "cross_kv": 500, "unet": 50}


def lbfgs_solve(X: torch.Tensor, Y: torch.Tensor, W0: torch.Tensor, iters: int) -> torch.Tensor:
    """LBFGS fit of ``W`` in ``X W^T ~ Y``, started at ``W0`` (the reference's solver).

    Args:
        X: ``[n, in]`` inputs of every concept; Y: ``[n, out]`` targets ``X_i (W0 + a_i dW_i)^T`` (no bias).
        W0: ``[out, in]`` start.
        iters: LBFGS ``max_iter``.
    Returns:
        ``[out, in]`` float32, the best W seen.
    """
    X = X.float().detach()
    Y = Y.float().detach()
    W = W0.float().detach().clone().requires_grad_(True)
    best = {"loss": float("inf"), "W": W.detach().clone()}
    opt = torch.optim.LBFGS([W], lr=1, max_iter=iters, history_size=25, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-16, tolerance_change=1e-16)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(F.linear(X, W), Y)
        if loss.item() < best["loss"]:
            best["loss"] = loss.item()
            best["W"] = W.detach().clone()
        loss.backward()
        return loss

    opt.step(closure)
    return best["W"]


def mse_objective(W: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> float:
    """``mean((X W^T - Y)^2)`` in float64: the objective both solvers are compared on."""
    X, Y, W = X.double(), Y.double(), W.double()
    return float(((X @ W.T - Y) ** 2).mean())


def layer_data(stats, prob, W0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the raw inputs a ``GramCollector(keep_inputs=True)`` kept for one layer, and their targets.

    Args:
        stats: the layer's ``LayerStats`` (with ``inputs``); prob: its ``LayerProblem``; W0: base weight.
    Returns:
        ``X [n, in_flat]``, ``Y [n, out]`` with ``Y_i = X_i (W0 + U_i D_i)^T`` per concept i (float64).
    """
    W0f = W0.reshape(W0.shape[0], -1).double()
    xs, ys = [], []
    for c, chunks in sorted(stats.inputs.items()):
        X = torch.cat(chunks, 0).double()
        Wi = W0f + (prob.ups[c] @ prob.downs[c]) if c in prob.ups else W0f
        xs.append(X)
        ys.append(X @ Wi.T)
    return torch.cat(xs, 0), torch.cat(ys, 0)
