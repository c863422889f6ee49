"""LoRA.rar: exact rank-(r_c + r_s) export, hypernetwork file round trip, training that generalises to a held-out
pair, and 2-process training equal to 1-process."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.adapters.io import AdapterError, apply_adapter, load_adapter, save_adapter
from lorakit.config import ConfigError, load_config
from lorakit.fileio import load_safetensors, save_safetensors
from lorakit.fusion.lorarar import MergerHypernet, hypernet_widths, load_hypernet, merge_pair, save_hypernet
from lorakit.fusion.ziplora import export_merged, merged_delta, plan_merge
from lorakit.testing import random_adapter, reset_accelerate, unet_inputs
from lorakit.training.lorarar import LoraRarConfig, train

ROOT = Path(__file__).resolve().parents[1]


def pair(pipe):
    content = random_adapter(pipe, "all", rank=4, alpha=2.0, seed=1, std=0.2)
    style = random_adapter(pipe, "upper", rank=8, alpha=8.0, seed=2, std=0.2)
    return content, style


def test_export_is_exact_rank_sum_lora(sd1_pipe, tmp_path):
    content, style = pair(sd1_pipe)
    plan = plan_merge(content, style, ["to_q", "to_out.0"])
    assert plan.merged and plan.summed and plan.content_only and not plan.style_only
    assert all(k.endswith(("to_q", "to_out.0")) for k in (la.key for la in plan.merged))
    g = torch.Generator().manual_seed(0)
    coeffs = {la.key: (torch.randn(la.content.down.shape[1], generator=g), torch.randn(la.content.down.shape[1], generator=g))
              for la in plan.merged}
    path = save_adapter(export_merged(plan, coeffs, {"lorakit.base_arch": "sd1"}), tmp_path / "merged.safetensors")
    merged = load_adapter(path)
    assert set(merged.modules) == set(content.modules) | set(style.modules)
    for la in plan.merged:
        dc, ds = la.content.delta(), la.style.delta()
        want = coeffs[la.key][0][None, :] * dc + coeffs[la.key][1][None, :] * ds
        assert torch.equal(want, merged_delta(dc, ds, *coeffs[la.key]))
        got = merged.modules[la.key]
        assert got.rank == 4 + 8
        torch.testing.assert_close(got.delta(), want, rtol=0, atol=1e-6)
    for la in plan.summed:
        torch.testing.assert_close(merged.modules[la.key].delta(), la.content.delta() + la.style.delta(), rtol=0, atol=1e-6)
    for key, mod in plan.content_only.items():
        torch.testing.assert_close(merged.modules[key].delta(), mod.delta(), rtol=0, atol=1e-6)

    # any tool loads it: peft injection of the file gives the UNet with W0 + merged delta
    pipe = copy.deepcopy(sd1_pipe)
    inputs = unet_inputs(pipe, seed=3)
    with torch.no_grad():
        for key, mod in merged.modules.items():
            layer = sd1_pipe.unet.get_submodule(key.split(".", 1)[1])
            pipe.unet.get_submodule(key.split(".", 1)[1]).weight.add_(mod.delta().reshape(layer.weight.shape))
        want = pipe.unet(**inputs).sample
        pipe2 = copy.deepcopy(sd1_pipe)
        apply_adapter(pipe2, merged)
        got = pipe2.unet(**inputs).sample
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_merge_pair_and_hypernet_file(sd1_pipe, tmp_path):
    content, style = pair(sd1_pipe)
    plan = plan_merge(content, style, ["to_q", "to_out.0"])
    torch.manual_seed(0)
    net = MergerHypernet(hypernet_widths([plan]), hidden=16, init_scale=1.0, base_arch="sd1")
    path = save_hypernet(net, tmp_path / "h.safetensors")
    again = load_hypernet(path)
    assert again.config == net.config
    merged = merge_pair(again, content, style)
    with torch.no_grad():
        coeffs = net.coefficients(plan)
    for la in plan.merged:
        m_c, m_s = coeffs[la.key]
        assert m_c.shape == (la.content.down.shape[1],)
        assert not torch.allclose(m_c, torch.ones_like(m_c))  # a real prediction, not the plain sum
        torch.testing.assert_close(merged.modules[la.key].delta(), merged_delta(la.content.delta(), la.style.delta(), m_c, m_s),
                                   rtol=0, atol=1e-6)
    # bad inputs are named
    save_safetensors({"x": torch.zeros(1)}, tmp_path / "bad.safetensors", {"lorakit.kind": "lora"})
    with pytest.raises(ValueError, match="bad.safetensors.*not a LoRA.rar hypernetwork"):
        load_hypernet(tmp_path / "bad.safetensors")
    with pytest.raises(AdapterError, match="no layer both adapters touch"):
        merge_pair(again, content, style, layers=["attn1.to_k.nope"])
    narrow = MergerHypernet([999], hidden=4)
    with pytest.raises(ValueError, match="no input layer for columns of length 32"):
        merge_pair(narrow, content, style, layers=["to_q"])


def cfg_for(tmp_path, *overrides):
    return load_config(LoraRarConfig, ROOT / "train_configs/toy_lorarar.yaml", [
        "base_model=tiny:sd1", f"output_dir={tmp_path}", "synthetic.images=random", "reference_size=16",
        "checkpointing_steps=0", "checkpoint_at_end=false", "logging=none", *overrides,
    ])


def test_training_evaluates_a_held_out_pair(sd1_pipe, tmp_path):
    reset_accelerate()
    cfg = cfg_for(tmp_path, "synthetic.content=3", "synthetic.style=3", "synthetic.eval_pairs=1", "max_steps=4",
                  "train_batch_size=2", "eval_batches=3")
    result = train(cfg, pipe=copy.deepcopy(sd1_pipe))
    (row,) = result.eval
    assert row["content"] == "synthetic-content-3" and row["style"] == "synthetic-style-3"  # never trained on
    assert all(row[k] > 0 for k in ("sum", "init", "lorarar"))
    tensors, meta = load_safetensors(result.final_path)
    assert meta["lorakit.kind"] == "lorarar-hypernet" and "lorakit.eval" in meta
    net = load_hypernet(result.final_path)
    for k, v in result.hypernet.state_dict().items():
        assert torch.equal(v, tensors[k])
    assert net.merge_layers == ["to_q", "to_out.0"]
    # On RANDOM LoRAs the held-out gain is not robust (docs/lorarar.md); the claim itself is checked on trained toy
    # LoRAs in test_hypernet_beats_sum_and_init_on_held_out_toy_pair.


def test_config_errors_name_the_key_and_file(tmp_path):
    with pytest.raises(ConfigError, match="merge_layers"):
        cfg_for(tmp_path, "merge_layer=[to_q]")
    reset_accelerate()
    with pytest.raises(FileNotFoundError, match="content: no LoRA file at .*nothing_here"):
        train(cfg_for(tmp_path, f"content=[{tmp_path}/nothing_here/*.safetensors]"))


@pytest.mark.slow  # 27-90 s in CI (2 processes / several trainings)
def test_two_processes_equal_one(tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 (gloo, CPU) x 1 pair == 1 process x 2 pairs."""
    args = ["--config", str(ROOT / "train_configs/toy_lorarar.yaml"), "base_model=tiny:sd1", "synthetic.content=2",
            "synthetic.style=1", "synthetic.eval_pairs=0", "synthetic.images=random", "reference_size=16", "max_steps=2",
            "seed=3", "logging=none", "checkpointing_steps=0", "checkpoint_at_end=false", "hidden=16"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
         str(ROOT / "train_lorarar.py"), *args, f"output_dir={tmp_path / 'two'}", "train_batch_size=1"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    reset_accelerate()
    one = train(load_config(LoraRarConfig, args[1], args[2:] + [f"output_dir={tmp_path / 'one'}", "train_batch_size=2"]))
    a, _ = load_safetensors(one.final_path)
    b, _ = load_safetensors(tmp_path / "two" / "lorarar_hypernet.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert a["head.bias"].tolist() != [1.0, 1.0]  # the network really trained (its bias starts at 1)


def test_fuse_cli_lorarar(sd1_pipe, tmp_path):
    from lorakit.cli import main

    content, style = pair(sd1_pipe)
    save_adapter(content, tmp_path / "c.safetensors")
    save_adapter(style, tmp_path / "s.safetensors")
    torch.manual_seed(0)
    net = MergerHypernet(hypernet_widths([plan_merge(content, style, ["to_q", "to_out.0"])]), hidden=8, init_scale=1.0)
    save_hypernet(net, tmp_path / "h.safetensors")
    out = tmp_path / "merged.safetensors"
    rc = main(["fuse", "--method", "lorarar", "--hypernet", str(tmp_path / "h.safetensors"), "--adapters",
               str(tmp_path / "c.safetensors"), str(tmp_path / "s.safetensors"), "--out", str(out)])
    assert rc == 0
    want = merge_pair(net, load_adapter(tmp_path / "c.safetensors"), load_adapter(tmp_path / "s.safetensors"))
    got = load_adapter(out)
    assert got.modules.keys() == want.modules.keys()
    for k, m in want.modules.items():
        torch.testing.assert_close(got.modules[k].delta(), m.delta(), rtol=0, atol=1e-6)
    assert main(["fuse", "--method", "lorarar", "--adapters", str(tmp_path / "c.safetensors"),
                 str(tmp_path / "s.safetensors"), "--out", str(out)]) == 2  # no --hypernet: a named error


# Held-out claim on the toy world, scored on 64 paired noise batches: the trained network's mean loss on the unseen
# pair is below the plain sum's and its initialisation's. Only the direction is asserted: measured with
# tools/measure_lorarar_heldout.py (docs/lorarar.md), the gain over the sum ranges from about 5 % (this recipe's
# LoRA order, seed 0: paired 95 % interval -9.3 % to -1.8 %) to 17 % with other seeds / LoRA orders, so a size
# threshold (the former ">= 5 %" on 4 batches, 4.4 % in CI) sits inside the run-to-run variation.
HELD_OUT_BATCHES = 64


@pytest.mark.slow
def test_hypernet_beats_sum_and_init_on_held_out_toy_pair(toy_loras):
    """The paper's claim on real trained LoRAs: the toy hypernetwork (4 characters/objects x 2 styles, the ghost
    character held out of training) lowers the ZipLoRA loss of the unseen ghost + ink pair below both the plain sum
    and its own initialisation, on average over 64 paired noise batches. LoRAs: the shared toy LoRA cache
    (``toy_loras``); the hypernetwork is the CI artifact (``tools/ci_artifacts.py``, cached by hash in
    artifacts/hypernet). References are the concepts' images named by the recipe, never a folder found in a LoRA's
    metadata."""
    import ci_artifacts as ci
    import measure_lorarar_heldout as measure

    from lorakit.models import load_base

    reset_accelerate()
    path = ci.train_hypernet(toy_loras, ROOT / "artifacts" / "hypernet", [], ("ghost", "ink"))
    pipe = load_base(str(ROOT / "data" / "toy-base"))
    pipe.set_progress_bar_config(disable=True)
    cfg = ci.hypernet_config(toy_loras, [], ("ghost", "ink"))
    (row,) = measure.evaluate(pipe, cfg, path, [0], HELD_OUT_BATCHES, "images")
    print(row)
    assert row["pair"][0].startswith("toy_ghost-") and row["pair"][1].startswith("toy_ink-")
    assert row["lorarar"] < row["sum"] and row["lorarar"] < row["init"], row
