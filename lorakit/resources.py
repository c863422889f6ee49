"""Files that ship with lorakit: the toy base model, the toy datasets, the toy oracle and the toy concept recipes.

In a clone they live in ``data/`` and ``train_configs/``; ``lorakit/_bundled`` links to them, and a wheel
(``pip install .``) carries copies there, so the same paths work from any working directory either way.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED = Path(__file__).resolve().parent / "_bundled"


def data_path(*parts: str) -> Path:
    """A path under the bundled ``data/`` folder, e.g. ``data_path("toy-base")``."""
    return BUNDLED.joinpath("data", *parts)


def toy_recipe(concept: str) -> Path:
    """The recipe ``toy_<concept>.yaml`` of a bundled toy concept (or ``lorarar``)."""
    return BUNDLED / "recipes" / f"toy_{concept}.yaml"
