"""Per-step schedules of the composition methods: which adapter is active (LoRA Switch), and CMLoRA's dominant
adapter, noise weights and cache refreshes per step.

Both follow the official code's behaviour (Multi-LoRA-Composition for Switch, the CMLoRA authors' code for
CMLoRA); :func:`cmlora_plan` has an ``official`` mode that keeps that code's known bugs and a ``lorakit`` mode
with them fixed (docs/sampling.md lists each). Everything here is plain Python on indices, so it is cheap to test
at the official step counts (220 for CMLoRA).
"""

from __future__ import annotations

from dataclasses import dataclass

# Concept categories of the ComposLoRA testbed, in the order its combinations list them (the background is
# taken out of CMLoRA's rotation and only joins it in the late phase).
KINDS = ("character", "clothing", "style", "background", "object")
ROTATION_KINDS = ("character", "clothing", "style", "object")
BACKGROUND = "background"
# The official code's late phase starts after this step, a constant tuned for its default of 220 steps.
OFFICIAL_LATE_AFTER = 120
OFFICIAL_DEFAULT_STEPS = 220
CACHE_REFRESH_RULES = ("dominant", "round", "age")


def switch_schedule(steps: int, n: int, every: int = 5) -> list[int]:
    """LoRA Switch's active adapter per step, as the reference's step-end callback rotates it.

    The callback runs after step i and moves to the next adapter when ``i > 0 and i % every == 0``, so the first
    adapter holds steps 0..every (``every + 1`` steps) and each later segment ``every`` steps
    (``[0]*6 + [1]*5 + [0]*5 + [1]*4`` for 20 steps, 2 adapters, every 5).
    """
    if n < 1 or every < 1:
        raise ValueError(f"switch needs n >= 1 adapters and every >= 1, got n={n}, every={every}")
    return [0 if s <= every else ((s - 1) // every) % n for s in range(steps)]


def cmlora_interval_steps(steps: int, interval: int = 0) -> list[int]:
    """The steps at which CMLoRA rotates the dominant adapter (the official ``interval_seq``).

    ``interval=0`` (the official default): every 2 steps up to ``int(0.375 T)``, every 3 up to ``int(0.875 T)``,
    then every 2 (at T = 20: 0 2 4 6 7 10 13 16 17 19); ``1``: every step; ``c >= 2``: every c steps.
    """
    if interval < 0:
        raise ValueError(f"cmlora interval must be >= 0, got {interval}")
    if interval == 0:
        a, b = int(0.375 * steps), int(0.875 * steps)
        return sorted([*range(0, a, 2), *range(a, b, 3), *range(b, steps, 2)])
    return list(range(0, steps, interval))


def category_sequence(kinds: list[str]) -> tuple[list[int], int]:
    """CMLoRA's official order from the adapters' categories.

    Adapters of the rotation kinds (character, clothing, style, object) come first, sorted by that order (the
    order of the testbed's combinations; ties keep the given order), then the backgrounds.

    Returns:
        ``(sequence of adapter indices, number of rotation adapters R)``.
    Raises:
        ValueError naming an unknown kind.
    """
    for i, k in enumerate(kinds):
        if k not in KINDS:
            raise ValueError(f"kind of adapter {i} is {k!r}; expected one of {', '.join(KINDS)}")
    rotation = sorted((i for i, k in enumerate(kinds) if k != BACKGROUND), key=lambda i: ROTATION_KINDS.index(kinds[i]))
    backgrounds = [i for i, k in enumerate(kinds) if k == BACKGROUND]
    if not rotation:  # only backgrounds: they rotate like any other adapter
        return backgrounds, len(backgrounds)
    return rotation + backgrounds, len(rotation)


def official_weights(n: int) -> tuple[float, float]:
    """(dominant, other) noise weights of the official code: (N - 0.5) / (2N - 1.5) and 1 / (2N - 1.5)."""
    return (n - 0.5) / (2 * n - 1.5), 1.0 / (2 * n - 1.5)


@dataclass
class CMLoRAPlan:
    """CMLoRA's schedule over positions of ``sequence`` (the UNet passes of a step run in that order).

    Attributes:
        sequence: adapter indices in pass order (rotation adapters first, then backgrounds).
        dominant: per step, the position of the dominant adapter.
        weights: per step, the noise weight of each position (they sum to 1).
        full: per step, per position: True for a full UNet pass, False for a shallow pass on the cache.
        rotations: the steps at which dominance rotates (the interval sequence).
    """

    sequence: list[int]
    dominant: list[int]
    weights: list[list[float]]
    full: list[list[bool]]
    rotations: list[int]


def _late_after(steps: int, official: bool) -> float:
    # lorakit mode: the late phase starts at the same fraction of the run as the official 120 of 220 steps.
    return OFFICIAL_LATE_AFTER if official else steps * OFFICIAL_LATE_AFTER / OFFICIAL_DEFAULT_STEPS


def _check_plan(mode: str, refresh: str, n: int, r: int) -> None:
    if mode not in ("lorakit", "official"):
        raise ValueError(f"cmlora mode must be lorakit or official, got {mode!r}")
    if refresh not in CACHE_REFRESH_RULES:
        raise ValueError(f"cache refresh must be one of {', '.join(CACHE_REFRESH_RULES)}, got {refresh!r}")
    if not 1 <= r <= n:
        raise ValueError(f"n_rotation must be in 1..{n}, got {r}")


def _rotation_refresh(indicator: int, n: int, r: int, late: bool, official: bool, refresh: str) -> set[int]:
    """Positions that run a full pass at a rotation step: the newly dominant one (not in the official late phase)
    and, under lorakit's ``round`` rule at the start of a round, every position outside the rotation."""
    out = set()
    if not late:
        out.add(indicator % r)
    elif not official:
        out.add(1 + indicator % r)
    if not official and refresh == "round" and indicator % r == 0:
        in_rotation = range(1, r + 1) if late else range(r)
        out.update(p for p in range(n) if p not in in_rotation)
    return out


def cmlora_plan(
    steps: int, sequence: list[int], n_rotation: int, interval: int = 0, mode: str = "lorakit",
    cache: bool = True, refresh: str = "round", max_age: int = 5, dominant_weight: float | None = None,
) -> CMLoRAPlan:
    """The dominant adapter, weights and cache refreshes of every step.

    Rotation (both modes): at each step of :func:`cmlora_interval_steps` the next adapter of the rotation
    (positions ``0..R-1``) becomes dominant; with backgrounds, the late phase rotates over positions ``1..R``
    instead (the first adapter leaves, the first background joins). Weights: dominant ``(N-0.5)/(2N-1.5)``, others
    ``1/(2N-1.5)`` (or ``dominant_weight`` and an equal share of the rest). Caching: every cache is filled at step
    0; at a rotation step the newly dominant adapter runs a full pass.

    ``mode="official"`` keeps the official code's behaviour exactly: the late phase starts after step 120, and
    from then on no cache is ever refreshed (so a background's cache, filled at step 0, is never refreshed).
    ``mode="lorakit"`` refreshes the newly dominant adapter in the late phase too, starts the late phase at
    120/220 of the steps, and adds the ``refresh`` rule: ``dominant`` (nothing more), ``round`` (at the start of each
    round of the rotation, every adapter outside the rotation also runs a full pass) or ``age`` (every cache older
    than ``max_age`` steps is refreshed).

    Args:
        steps: number of denoising steps T.
        sequence: adapter indices in pass order; the first ``n_rotation`` rotate, the rest are backgrounds.
        interval: the official cache interval (0 = the 2/3/2 sequence).
        cache: False gives a full pass everywhere (same weights and dominance).
    Returns:
        :class:`CMLoRAPlan`.
    """
    _check_plan(mode, refresh, len(sequence), n_rotation)
    n, r = len(sequence), n_rotation
    official = mode == "official"
    rotations = cmlora_interval_steps(steps, interval)
    rot_set, late_after = set(rotations), _late_after(steps, official)
    if dominant_weight is None:
        w_dom, w_other = official_weights(n)
    else:
        w_dom, w_other = (1.0, 0.0) if n == 1 else (dominant_weight, (1.0 - dominant_weight) / (n - 1))
    indicator, last_full = 0, [None] * n
    plan = CMLoRAPlan(list(sequence), [], [], [], rotations)
    for i in range(steps):
        late = r < n and i > late_after
        refresh_now = set()
        if i in rot_set:
            refresh_now = _rotation_refresh(indicator, n, r, late, official, refresh)
            indicator += 1
        dom = (indicator - 1) % r + (1 if late else 0)
        row = []
        for p in range(n):
            full = not cache or last_full[p] is None or p in refresh_now
            full = full or (not official and refresh == "age" and i - last_full[p] >= max_age)
            if full:
                last_full[p] = i
            row.append(full)
        plan.dominant.append(dom)
        plan.weights.append([w_dom if p == dom else w_other for p in range(n)])
        plan.full.append(row)
    return plan
