"""Toy world v2 oracle: a small CNN over 64x64 images that says which v2 concepts an image shows.

Multi-label presence of every generic, class and identity concept of :mod:`lorakit.toyworld.v2.concepts`; an
identity also shows its class (``kwibbit`` is a ``frog``), so ``frog`` without ``kwibbit`` means "a frog that is
not kwibbit". Trained by ``tools/train_oracle_v2.py``; scores come as v1's
:class:`lorakit.toyworld.oracle.OracleScores`::

    from lorakit.toyworld.v2.oracle import Oracle
    s = Oracle.load().score(images, ["frog", "kwibbit"])  # the bundled data/toy2-oracle, or Oracle.load(folder)
    s.rates  # {"frog": 1.0, "kwibbit": 0.25}
"""

from __future__ import annotations

import os
from pathlib import Path

from lorakit.resources import data_path
from lorakit.toyworld import oracle as v1
from lorakit.toyworld.oracle import OracleScores  # noqa: F401 - what score() returns, importable from here

IMAGE_SIZE = 64
DEFAULT_ORACLE = data_path("toy2-oracle")


class OracleNet(v1.OracleNet):
    """v1's oracle CNN at 64x64: ``[N, 3, 64, 64]`` RGB in [0, 1] -> presence logits ``[N, n_concepts]``."""

    def __init__(self, n_concepts: int, width: int = 32, row_heads=()):
        super().__init__(n_concepts, width, image_size=IMAGE_SIZE, row_heads=row_heads)


def to_tensor(images):
    """PIL images (any size) or a float tensor ``[N, 3, H, W]`` in [0, 1] -> ``[N, 3, 64, 64]`` float."""
    return v1.to_tensor(images, IMAGE_SIZE)


class Oracle(v1.Oracle):
    """A loaded v2 oracle: ``Oracle.load(folder)``, then :meth:`score` (v2 concept names)."""

    image_size = IMAGE_SIZE
    trainer = "tools/train_oracle_v2.py"

    @classmethod
    def default_dir(cls) -> Path:
        return DEFAULT_ORACLE

    @classmethod
    def check_config(cls, config: dict, path: Path) -> None:
        if config.get("world") != "v2":
            raise ValueError(f"{path}: not a toy world v2 oracle (use lorakit.toyworld.oracle for v1)")

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> Oracle:
        """Load ``<path>/config.json`` + ``<path>/oracle.safetensors`` (default: the bundled ``data/toy2-oracle``)."""
        return super().load(path)

    def concept_name(self, name: str) -> str:
        return name  # v2 names are the concept ids (a trigger is its identity's name)
