"""Toy world v2 identity LoRAs trained in parts (tools/train_toy2_loras.py): a recipe stopped and resumed gives
the same LoRA, bit for bit and under the same recipe hash, as one uninterrupted run."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    return importlib.import_module("train_toy2_loras")  # tools/ is on sys.path (conftest)


def _random_pipe(root: Path) -> Path:
    from lorakit.toyworld.v2.models import build_toy_pipeline

    build_toy_pipeline(0).save_pretrained(root / "pipe")
    return root / "pipe"


def test_partial_step_reads_the_newest_complete_checkpoint(tmp_path):
    from lorakit.toyworld.loras import partial_dir, partial_step

    target = tmp_path / "toy2_kwibbit-0123.safetensors"
    assert partial_dir(target) == tmp_path / ".toy2_kwibbit-0123.partial"
    assert partial_step(target) == 0
    for step in (50, 100):
        (partial_dir(target) / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
    assert partial_step(target) == 100


def test_tool_refuses_a_class_name_with_status_2(tmp_path, capsys):
    from lorakit.errors import run_guarded

    tool = _tool()
    rc = run_guarded(lambda: tool.main(["--base", str(tmp_path), "--out", str(tmp_path / "o"),
                                        "--identities", "frog"]), "t")
    assert rc == 2 and "v2 LoRAs are made for the identities" in capsys.readouterr().err


@pytest.mark.slow
def test_chunked_training_equals_one_run_and_stops_at_the_budget(tmp_path):
    from lorakit.toyworld.loras import partial_dir, partial_step
    from lorakit.toyworld.v2.loras import lora_path, train_identity_lora, train_identity_lora_chunk

    pipe, over = _random_pipe(tmp_path), ["max_steps=4", "train_batch_size=2"]
    whole = train_identity_lora("kwibbit", tmp_path / "whole", pipe, over)

    parts = tmp_path / "parts"
    target = lora_path("kwibbit", parts, pipe, over)
    assert target.name == whole.name  # the same recipe hash
    assert train_identity_lora_chunk("kwibbit", parts, pipe, 2, over) is None
    assert partial_step(target) == 2 and not target.exists()
    assert train_identity_lora_chunk("kwibbit", parts, pipe, 2, over) is None  # already there: nothing to do
    assert train_identity_lora_chunk("kwibbit", parts, pipe, 10, over) == target  # stops at max_steps
    assert not partial_dir(target).exists()
    a, b = load_file(whole), load_file(target)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # The tool's budget: a fake clock where each part takes 5 s and 7 s are left after the first part.
    tool, ticks = _tool(), iter([0.0, 5.0, 5.0])
    row = tool.train_within("kwibbit", str(tmp_path / "budget"), str(pipe), over, 1, 7.0, clock=lambda: next(ticks))
    assert row == {"identity": "kwibbit", "done": False, "step": 1, "max_steps": 4, "adapter": None}
    row = tool.train_within("kwibbit", str(tmp_path / "budget"), str(pipe), over, 3, 1e9)
    assert row["done"] and row["step"] == 4
    c = load_file(row["adapter"])
    assert Path(row["adapter"]).name == whole.name and all(torch.equal(a[k], c[k]) for k in a)
