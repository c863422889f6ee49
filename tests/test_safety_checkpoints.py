"""Checkpoints: no pickle on save or resume, never a poisoned "last good" one, never another run's (issue 13,
cases 2, 3, 4, 6 and the resume cases of 9)."""

from __future__ import annotations

import fcntl
import os
import pickle

import pytest
import torch

from lorakit.config import load_config
from lorakit.fileio import load_safetensors
from lorakit.training.loop import TrainConfig, TrainingDiverged, latest_checkpoint
from lorakit.training.state import CheckpointError


class Net(torch.nn.Module):
    def __init__(self, hidden=4):
        super().__init__()
        self.a = torch.nn.Linear(3, hidden)
        self.drop = torch.nn.Dropout(0.2)  # resume must restore the RNG exactly for the masks to match
        self.b = torch.nn.Linear(hidden, 1)

    def forward(self, x):
        return self.b(self.drop(torch.tanh(self.a(x))))


@pytest.fixture
def run(regression_loop):
    """The shared loop on :class:`Net` (dropout), learning rate 0.05; NaN loss or NaN gradients from a step on."""

    def loss_fn(batch, step, model, cfg, nan_at, nan_grad_at):
        loss = torch.nn.functional.mse_loss(model(batch["x"]).squeeze(-1), batch["y"])
        if nan_at is not None and step + 1 >= nan_at:
            loss = loss * float("nan")
        if nan_grad_at is not None and step + 1 >= nan_grad_at:
            w = model.b.bias
            loss = loss + 0.0 * torch.sqrt(w - w).sum()  # value unchanged, gradient NaN
        return loss

    def run(out, overrides, nan_at=None, nan_grad_at=None, hidden=4):
        return regression_loop(out, ["learning_rate=0.05", *overrides], lambda: Net(hidden),
                               lambda *a: loss_fn(*a, nan_at, nan_grad_at))

    return run


def test_checkpoints_hold_no_pickle_and_resume_is_bitwise_exact(tmp_path, run):
    full = run(tmp_path / "full", ["max_steps=10", "gradient_accumulation_steps=2"])
    half = run(tmp_path / "split", ["max_steps=10", "stop_at_step=5", "gradient_accumulation_steps=2"])
    names = sorted(p.name for p in half.checkpoint.iterdir())
    assert all(n.endswith((".safetensors", ".json")) for n in names), names
    rest = run(tmp_path / "split", ["max_steps=10", "gradient_accumulation_steps=2", "resume=latest"])
    assert rest.losses == full.losses[5:]
    a, _ = load_safetensors(full.final_path)
    b, _ = load_safetensors(rest.final_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Plant:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_planted_pickles_are_never_loaded(tmp_path, capsys, run):
    out = tmp_path / "run"
    half = run(out, ["max_steps=6", "stop_at_step=3"])
    sentinel = tmp_path / "pwned"
    payload = pickle.dumps(_Plant(sentinel))
    for name in ("random_states_0.pkl", "custom_checkpoint_0.pkl", "optimizer.bin", "scaler.pt", "model.pth"):
        (half.checkpoint / name).write_bytes(payload)
    rest = run(out, ["max_steps=6", "resume=latest"])  # ignored, named, never opened
    assert rest.global_step == 6 and not sentinel.exists()
    assert "ignoring" in capsys.readouterr().out
    # every file of the checkpoint replaced by the payload: a clear refusal, nothing runs
    ck = latest_checkpoint(out)
    for p in ck.iterdir():
        p.write_bytes(payload)
    with pytest.raises(ValueError, match=r"lorakit never loads pickles|not a lorakit checkpoint"):
        run(out, ["max_steps=8", "resume=latest"])
    with pytest.raises(ValueError, match=str(ck.name)):
        run(out, ["max_steps=8", f"resume={ck}"])
    assert not sentinel.exists()


def test_accelerate_style_checkpoint_is_refused(tmp_path, run):
    ck = tmp_path / "old" / "checkpoints" / "checkpoint-4"
    ck.mkdir(parents=True)
    (ck / "lorakit_loop.json").write_text('{"global_step": 4}')
    (ck / "random_states_0.pkl").write_bytes(pickle.dumps(_Plant(tmp_path / "pwned")))
    with pytest.raises(ValueError, match=r"random_states_0.pkl.*never loads pickles"):
        run(tmp_path / "new", ["max_steps=6", f"resume={ck}"])
    assert not (tmp_path / "pwned").exists()


def test_nan_loss_names_the_real_last_good_checkpoint(tmp_path, run):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as err:
        run(out, ["max_steps=8", "checkpointing_steps=1", "checkpoints_total_limit=1"], nan_at=4)
    msg = str(err.value)
    assert "at step 4" in msg and "Last good checkpoint: " + str(out / "checkpoints" / "checkpoint-2") in msg
    # checkpoint-3's weights led straight to the NaN: renamed, never resumed; the good one survived rotation
    assert latest_checkpoint(out).name == "checkpoint-2"
    assert (out / "checkpoints" / "diverged-checkpoint-3").is_dir()
    res = run(out, ["max_steps=4", "resume=latest"])
    assert res.global_step == 4 and all(torch.isfinite(torch.tensor(res.losses)))


def test_message_says_when_the_first_checkpoint_was_due(tmp_path, run):
    with pytest.raises(TrainingDiverged, match=r"none yet \(the first was due at step 5\)"):
        run(tmp_path, ["max_steps=8", "checkpointing_steps=5"], nan_at=3)
    with pytest.raises(TrainingDiverged, match=r"checkpointing_steps=0"):
        run(tmp_path / "b", ["max_steps=8", "checkpointing_steps=0"], nan_at=3)


def test_non_finite_weights_are_never_checkpointed(tmp_path, run):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"b.bias holds NaN/inf after step 3.*checkpoint-2"):
        run(out, ["max_steps=8", "checkpointing_steps=1", "max_grad_norm=0"], nan_grad_at=3)
    assert latest_checkpoint(out).name == "checkpoint-2"
    tensors, _ = load_safetensors(out / "checkpoints" / "checkpoint-2" / "params.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_a_new_run_never_takes_over_an_old_runs_checkpoints(tmp_path, run):
    out = tmp_path / "run"
    run(out, ["max_steps=6", "checkpointing_steps=3"])
    # the same folder, another run: refused at once, nothing removed
    with pytest.raises(ValueError, match=r"already holds an earlier run.*checkpoint-6.*resume=latest.*overwrite=true"):
        run(out, ["max_steps=2", "learning_rate=0.01"])
    with pytest.raises(ValueError, match=r"belong to another run \(learning_rate: 0.05 -> 0.01\)"):
        run(out, ["max_steps=8", "learning_rate=0.01", "resume=latest"])
    assert latest_checkpoint(out).name == "checkpoint-6"
    # overwrite=true: a fresh start whose own checkpoints are kept
    res = run(out, ["max_steps=2", "learning_rate=0.01", "checkpointing_steps=1", "overwrite=true"])
    assert res.global_step == 2 and latest_checkpoint(out).name == "checkpoint-2"
    # resume=latest continues this run (more steps allowed), not the old one
    res = run(out, ["max_steps=4", "learning_rate=0.01", "checkpointing_steps=1", "resume=latest"])
    assert len(res.losses) == 2


def test_resume_with_another_network_is_a_clear_error(tmp_path, run):
    out = tmp_path / "run"
    half = run(out, ["max_steps=4", "stop_at_step=2"])
    with pytest.raises(ValueError, match=r"a.weight is \[4, 3\] in the checkpoint but \[8, 3\] now"):
        run(out, ["max_steps=4", f"resume={half.checkpoint}"], hidden=8)


def test_second_writer_fails_at_once(tmp_path, run):
    out = tmp_path / "run"
    run(out, ["max_steps=1"])
    with open(out / ".lorakit.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="in use by another lorakit run"):
            run(out, ["max_steps=2", "resume=latest"])


def test_output_dir_checked_before_training(tmp_path, run):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="did not write"):
        run(mine, ["max_steps=1"])
    assert os.listdir(mine) == ["notes.txt"]
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        run(f, ["max_steps=1"])
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(ValueError, match="not writable"):
                run(ro / "out", ["max_steps=1"])
        finally:
            ro.chmod(0o700)


@pytest.mark.parametrize("override,needle", [
    ("learning_rate=-1e-4", "learning_rate=-0.0001: expected a positive number"),
    ("learning_rate=0", "learning_rate=0.0: expected a positive number"),
    ("gradient_accumulation_steps=0", "gradient_accumulation_steps=0: expected >= 1"),
    ("max_steps=0", "max_steps=0: expected >= 1"),
])
def test_bad_numbers_are_refused_before_anything(tmp_path, override, needle, run):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        run(tmp_path, [override])
    assert not tmp_path.joinpath("checkpoints").exists()


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_environment_secrets_never_reach_a_file(tmp_path, monkeypatch, run):
    """Issue 13 case 5: ${oc.env:...} values stay unresolved in everything a run writes (checkpoints, logs)."""
    from lorakit.config import to_dict

    monkeypatch.setenv("LK_TEST_TOKEN", "hf_s3cr3t_value")
    out = tmp_path / "run"
    run(out, ["max_steps=2", "checkpointing_steps=1", "logging=tensorboard", "base_model=${oc.env:LK_TEST_TOKEN}",
               "output_name=lora_${base_model}_x"])
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".json" for p in files) and any("tfevents" in p.name for p in files)
    for p in files:
        assert b"hf_s3cr3t_value" not in p.read_bytes(), p
    cfg = load_config(TrainConfig, None, ["base_model=${oc.env:LK_TEST_TOKEN}", "output_name=a${base_model}"])
    assert cfg.base_model == "hf_s3cr3t_value"  # the run itself sees the value
    d = to_dict(cfg)
    assert d["base_model"] == "${oc.env:LK_TEST_TOKEN}" and d["output_name"] == "a${base_model}"


def test_unwritable_output_dir_fails_before_training(tmp_path, monkeypatch, run):
    """Issue 13 case 8 (also when the tests run as root, where chmod does not stop writes)."""
    import lorakit.outputs

    real = os.access
    monkeypatch.setattr(lorakit.outputs.os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    with pytest.raises(ValueError, match=r"output_dir .*: the folder .* is not writable"):
        run(tmp_path / "out", ["max_steps=1"])


def test_half_written_checkpoint_of_a_killed_run_is_cleaned(tmp_path, run):
    """Issue 13 case 10: a `.tmp-checkpoint-N` left by kill -9 is removed by the next run (it holds the lock)."""
    out = tmp_path / "run"
    run(out, ["max_steps=4", "stop_at_step=2"])
    stale = out / "checkpoints" / ".tmp-checkpoint-3"
    stale.mkdir()
    (stale / "params.safetensors").write_bytes(b"half")
    res = run(out, ["max_steps=4", "resume=latest"])
    assert res.global_step == 4 and not stale.exists()
