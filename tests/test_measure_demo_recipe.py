"""tools/measure_demo_recipe.py: the demo's single-LoRA and merge rows for two LoRA pairs, paired by seed."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


@pytest.mark.slow
def test_the_same_pair_twice_agrees_on_every_seed(tmp_path, capsys):
    """The rows are the demo's three, each with n seeds; the same LoRA files as A and B give the same verdict on
    every seed (wins = losses = 0, p = 1): images are made from the seeds alone, so a pairing can be trusted."""
    from lorakit.adapters.io import save_adapter
    from lorakit.sampling import load_pipeline
    from lorakit.testing import random_adapter
    from lorakit.toyworld.v2.models import DEFAULT_BASE

    tool = importlib.import_module("measure_demo_recipe")
    pipe = load_pipeline(str(DEFAULT_BASE), "fp32")
    files = []
    for seed in (1, 2):
        files.append(str(tmp_path / f"l{seed}.safetensors"))
        save_adapter(random_adapter(pipe, seed=seed, std=0.2), files[-1])
    assert tool.main(["--a", *files, "--b", *files, "--n", "2", "--sample-steps", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["row"] for r in rows] == ["kwibbit_only", "nocturo_only", "merge"]
    for r in rows:
        assert r["n"] == 2 and r["a"] == r["b"] and r["a"]["n"] == 2
        assert r["a_vs_b"] == {"pairs": 2, "wins": 0, "losses": 0, "p": 1.0}
