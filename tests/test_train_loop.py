"""The shared training loop on a tiny regression model: exact resume, NaN stop, artifacts, sampler layout."""

from __future__ import annotations

import pytest
import torch

from lorakit.fileio import load_safetensors
from lorakit.training.loop import (
    GlobalBatchSampler,
    TrainingDiverged,
    latest_checkpoint,
    randn_per_sample,
)


@pytest.fixture
def run(regression_loop):
    """The shared loop on a linear model, learning rate 0.3 with 2 warm-up steps, per-sample input noise."""

    def loss_fn(batch, step, model, cfg, nan_at):
        noise = randn_per_sample((3,), batch["sample_id"], cfg.seed) * 0.1
        loss = torch.nn.functional.mse_loss(model(batch["x"] + noise).squeeze(-1), batch["y"])
        return loss * float("nan") if nan_at is not None and step + 1 >= nan_at else loss

    def run(out, overrides, nan_at=None):
        return regression_loop(out, ["learning_rate=0.3", "lr_warmup_steps=2", *overrides],
                               lambda: torch.nn.Linear(3, 1), lambda *a: loss_fn(*a, nan_at))

    return run


def test_resume_is_bitwise_exact_and_loss_falls(tmp_path, run):
    full = run(tmp_path / "full", ["max_steps=16", "gradient_accumulation_steps=2"])
    assert sum(full.losses[-4:]) / 4 < 0.5 * sum(full.losses[:4]) / 4
    half = run(tmp_path / "split", ["max_steps=16", "stop_at_step=8", "gradient_accumulation_steps=2",
                                     "checkpointing_steps=0"])
    assert half.checkpoint.name == "checkpoint-8" and half.final_path.name == "lora-step000008.safetensors"
    rest = run(tmp_path / "split", ["max_steps=16", "gradient_accumulation_steps=2", "resume=latest"])
    assert rest.global_step == 16 and len(rest.losses) == 8
    assert rest.losses == full.losses[8:]
    a, _ = load_safetensors(full.final_path)
    b, _ = load_safetensors(rest.final_path)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert latest_checkpoint(tmp_path / "split").name == "checkpoint-16"


def test_nan_loss_stops_with_step_and_checkpoint(tmp_path, run):
    # checkpoint-4's weights led straight to the NaN: the last good one is checkpoint-2 (see test_safety_checkpoints)
    with pytest.raises(TrainingDiverged, match=r"at step 5.*Last good checkpoint: \S*checkpoint-2 .*diverged-checkpoint-4"):
        run(tmp_path, ["max_steps=8", "checkpointing_steps=2"], nan_at=5)


def test_periodic_and_final_artifacts(tmp_path, run):
    res = run(tmp_path, ["max_steps=4", "save_every=2", "output_name=toy"])
    files = sorted(tmp_path.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    assert [p.name for p in files] == ["toy-step000002.safetensors", "toy.safetensors"]
    assert res.final_path == files[-1]


def test_checkpointing_steps_zero_writes_no_checkpoint(tmp_path, run):
    res = run(tmp_path / "none", ["max_steps=4", "checkpointing_steps=0"])
    assert res.checkpoint is None and latest_checkpoint(tmp_path / "none") is None
    assert not (tmp_path / "none" / "checkpoints").exists()
    res = run(tmp_path / "asked", ["max_steps=4", "checkpointing_steps=0", "checkpoint_at_end=true"])
    assert res.checkpoint.name == "checkpoint-4"
    res = run(tmp_path / "every", ["max_steps=4", "checkpointing_steps=3"])  # periodic + the end by default
    assert res.checkpoint.name == "checkpoint-4"


def test_sampler_layouts_give_the_same_global_batches():
    groups = [list(range(7)), list(range(7, 12))]
    one = GlobalBatchSampler(groups, batch_size=4, num_processes=1, seed=3)
    two = [GlobalBatchSampler(groups, batch_size=2, num_processes=2, process_index=p, seed=3) for p in (0, 1)]
    it1, it2 = iter(one), [iter(s) for s in two]
    for _ in range(2 * one.batches_per_epoch):
        assert next(it1) == next(it2[0]) + next(it2[1])
    # every batch comes from one group (bucket), and each epoch covers every index
    batches = one.epoch_batches(0)
    assert all(set(b) <= set(groups[0]) or set(b) <= set(groups[1]) for b in batches)
    assert set().union(*batches) == set(range(12))
    # resume from a position continues the same stream
    it = iter(GlobalBatchSampler(groups, batch_size=4, seed=3, start=3))
    ref = iter(GlobalBatchSampler(groups, batch_size=4, seed=3))
    for _ in range(3):
        next(ref)
    assert next(it) == next(ref)
