"""Small statistics every toy measurement reports: Wilson intervals for rates, exact paired tests for "A beats B".

>>> wilson(48, 64)              # 95% interval of the rate 48/64
(0.6318..., 0.8398...)
>>> mcnemar_exact(12, 3)        # A right and B wrong on 12 paired images, the reverse on 3
0.0351...
"""

from __future__ import annotations

import math


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% for ``z`` = 1.96) of the rate ``k / n``; ``(0, 1)`` when ``n`` is 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value (= the sign test on the discordant pairs: binomial with p = 1/2).

    ``wins``: pairs where A succeeds and B fails; ``losses``: the reverse. Ties carry no information.
    """
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def rate(k: int, n: int) -> dict:
    """``{"rate", "k", "n", "wilson95": [lo, hi]}`` rounded to 3 digits, for JSON reports."""
    lo, hi = wilson(k, n)
    return {"rate": round(k / n, 3) if n else None, "k": int(k), "n": int(n), "wilson95": [round(lo, 3), round(hi, 3)]}


def fmt_rate(k: int, n: int) -> str:
    """``"0.75 [0.63, 0.84] (48/64)"``: a rate with its 95% Wilson interval and counts, for tables."""
    if n == 0:
        return "- (0/0)"
    lo, hi = wilson(k, n)
    return f"{k / n:.2f} [{lo:.2f}, {hi:.2f}] ({k}/{n})"


def paired(a: list[bool], b: list[bool]) -> dict:
    """Paired comparison of two methods on the same items: ``a[i]`` / ``b[i]`` say whether each succeeded.

    Returns ``{"pairs", "wins" (a only), "losses" (b only), "p" (exact McNemar, two-sided)}``.
    """
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same items: {len(a)} vs {len(b)} results")
    wins = sum(x and not y for x, y in zip(a, b))
    losses = sum(y and not x for x, y in zip(a, b))
    return {"pairs": len(a), "wins": wins, "losses": losses, "p": float(f"{mcnemar_exact(wins, losses):.3g}")}
