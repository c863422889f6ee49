"""Composition sets of the toy benchmark, for either toy world: one character plus one concept of each of N-1
of the other kinds, every combination, or a seeded sample of them per N."""

from __future__ import annotations

import itertools

import numpy as np

CATEGORIES = ("object", "style", "background")


def concept_sets(by_kind: dict[str, list[str]], sizes, per_size: int | None = None,
                 seed: int = 0) -> list[tuple[int, dict[str, str]]]:
    """``[(n, {kind: name})]``: for each N in ``sizes``, every set of one ``by_kind["character"]`` and one name of
    each of N-1 of :data:`CATEGORIES`, character first; with ``per_size``, a sample of that many per N (all of them
    when there are fewer), drawn with ``numpy.random.default_rng(seed)`` (one generator for all sizes).

    Raises:
        ValueError: for a size outside 2..4.
    """
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        if not 2 <= n <= 1 + len(CATEGORIES):
            raise ValueError(f"set size {n}: expected 2..{1 + len(CATEGORIES)} (a character and 1-3 other kinds)")
        sets = []
        for cats in itertools.combinations(CATEGORIES, n - 1):
            for char in by_kind["character"]:
                for picks in itertools.product(*(by_kind[c] for c in cats)):
                    sets.append({"character": char, **dict(zip(cats, picks))})
        if per_size is not None and per_size < len(sets):
            sets = [sets[i] for i in sorted(rng.choice(len(sets), per_size, replace=False))]
        out.extend((n, concepts) for concepts in sets)
    return out
