"""CUDA paths: bf16 / fp16 mixed precision, 8-bit AdamW, gradient checkpointing, 2-GPU DDP == 1 GPU,
and the memory estimate against the allocator's peak. All marked ``cuda`` (skipped without a GPU, see conftest);
tools/gpu_check.sh runs them on a lent GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.config import load_config
from lorakit.fileio import load_safetensors
from lorakit.testing import reset_accelerate
from lorakit.training.blockwise import BlockwiseConfig, train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.cuda


def _images(folder: Path, n: int = 2, res: int = 32) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("zorbo, red circle")
    return folder


def _train(tmp_path, name: str, *overrides, base: str = "tiny:sd1"):
    reset_accelerate()
    data = _images(tmp_path / "img")
    cfg = load_config(BlockwiseConfig, None, [
        f"base_model={base}", f"data.path={data}", f"output_dir={tmp_path / name}", "logging=none", "max_steps=3",
        "checkpointing_steps=0", "checkpoint_at_end=false", "data.resolution=32", "train_batch_size=2",
        "learning_rate=1e-3", "data.cache_latents=false", *overrides,
    ])
    return train(cfg)


@pytest.mark.parametrize("precision,base", [("bf16", "tiny:sd1"), ("fp16", "tiny:sd1"), ("fp16", "tiny:sdxl")])
def test_mixed_precision_trains_on_cuda(tmp_path, precision, base):
    res = _train(tmp_path, precision, f"mixed_precision={precision}", base=base)
    tensors, _ = load_safetensors(res.final_path)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert max(float(t.abs().max()) for k, t in tensors.items() if "lora_up" in k) > 0  # it trained


def test_adamw8bit_on_cuda(tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed on this machine")
    res = _train(tmp_path, "8bit", "optimizer=adamw8bit", "mixed_precision=bf16")
    tensors, _ = load_safetensors(res.final_path)
    assert all(torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_edlora_trains_on_cuda(tmp_path, precision):
    """The ED-LoRA trainer places the base on the GPU before adding its rows and LoRA (the first GPU run failed
    there: rows drawn on the CPU met the class word's CUDA row)."""
    from lorakit.training.edlora import EDLoRAConfig
    from lorakit.training.edlora import train as train_edlora

    reset_accelerate()
    data = _images(tmp_path / "img")
    for cap in data.glob("*.txt"):
        cap.write_text("a photo of <TOK>")
    cfg = load_config(EDLoRAConfig, None, [
        "base_model=tiny:sd1", f"data.path={data}", f"output_dir={tmp_path / 'out'}", "logging=none", "max_steps=3",
        "checkpointing_steps=0", "checkpoint_at_end=false", "data.resolution=32", "train_batch_size=2",
        f"mixed_precision={precision}", "concept.tokens=<cat1> <cat2>", "concept.init_word=cat",
        "concept.placeholder=<TOK>", "sample_every=0",
    ])
    tensors, _ = load_safetensors(train_edlora(cfg).final_path)
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())


def test_gradient_checkpointing_matches_plain_on_cuda(tmp_path, monkeypatch):
    # cuDNN's default (TF32 convs, non-deterministic weight-gradient kernels) makes two plain runs differ by 2e-3
    # on an H200 after 3 AdamW steps (near-zero gradients flip sign, AdamW moves them a whole lr = 1e-3), as much as
    # a block that lost its gradient would; deterministic fp32 kernels leave 2e-6 between two plain runs and 3.5e-6
    # between plain and checkpointed.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    plain, _ = load_safetensors(_train(tmp_path, "plain").final_path)
    ckpt, _ = load_safetensors(_train(tmp_path, "ckpt", "gradient_checkpointing=true").final_path)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-3, atol=1e-4)


def test_memory_estimate_vs_cuda_peak():
    """lorakit.memory's step estimate against torch.cuda.max_memory_allocated of a real mid-size bf16 train step."""
    from lorakit.memory import _add_lora, estimate
    from lorakit.models import sized_pipeline

    pipe = sized_pipeline("sd1", "mid", dtype=torch.bfloat16, device="cuda")
    unet = pipe.unet.requires_grad_(False)
    _add_lora(unet, "sd1", 4, conv=False)
    for n, p in unet.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
    ehs = torch.randn(2, 77, 32, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        unet(x, torch.tensor([10, 500], device="cuda"), ehs).sample.float().pow(2).mean().backward()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before
    est = estimate("train", "random:sd1:mid", resolution=128, batch=2, dtype=torch.bfloat16, device="cuda")
    assert 0.5 <= measured / est.parts["step"] <= 2.0, (measured / 2**20, est.parts["step"] / 2**20)


def test_two_gpus_equal_one(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    data = _images(tmp_path / "img", n=4)
    common = [f"data.path={data}", "base_model=tiny:sd1", "max_steps=2", "logging=none", "checkpoint_at_end=false",
              "learning_rate=1e-2", "adam_epsilon=1e-3", "data.cache_latents=false", "data.resolution=32",
              "checkpointing_steps=0"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    two = subprocess.run([*launch, "--num_processes", "2", str(ROOT / "train_blockwise.py"), *common,
                          f"output_dir={tmp_path / 'two'}", "train_batch_size=1"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _train(tmp_path, "one", *common[2:], "train_batch_size=2")
    a, _ = load_safetensors(one.final_path)
    b, _ = load_safetensors(tmp_path / "two" / "lora.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4)
