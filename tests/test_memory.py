"""Memory pre-flight: the meta-device trace, the estimate against measured peak RSS, and the refusals (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit import memory
from lorakit.cli import main
from lorakit.memory import GIB, LiveBytes, estimate, unet_step_peak

ROOT = Path(__file__).resolve().parents[1]
# The stated accuracy: measured peak RSS / estimate lies in [1 / FACTOR, FACTOR] on the tiny and mid models.
FACTOR = 1.5


def test_live_bytes_counts_peak_and_frees():
    with LiveBytes() as live:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        b = torch.empty(500, dtype=torch.float64)  # 4000 bytes
        view = a[:10]  # a view: no new storage
        del a, view
        c = torch.empty(250, dtype=torch.float32)  # 1000 bytes, after a is gone
        del b, c
    assert live.peak == 8000 and live.live == 0


def test_meta_trace_equals_real_tensor_trace(sd1_pipe):
    """The same train step traced on real CPU tensors and on meta tensors gives the same peak (attention aside:
    the tiny UNet's attention is small next to its convolutions, and the meta stand-in is the fused kernel's)."""
    from diffusers import UNet2DConditionModel

    from lorakit.memory import _add_lora

    peaks = {}
    for device in ("cpu", "meta"):
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(sd1_pipe.unet.config)
        _add_lora(unet, "sd1", 4, conv=False)
        if device == "cpu":
            x = torch.randn(2, 4, 16, 16)
            with LiveBytes(list(unet.parameters()) + list(unet.buffers())) as live:
                unet(x, torch.tensor([10, 500]), torch.randn(2, 77, 32)).sample.pow(2).mean().backward()
            peaks[device] = live.peak
        else:
            peaks[device] = unet_step_peak(unet, "sd1", 2, 16, torch.float32, train=True)
    assert peaks["meta"] == pytest.approx(peaks["cpu"], rel=0.15)


@pytest.mark.slow  # 11.3 s of CPU (measured 2026-12-03, one thread)
def test_estimate_parts_grow_as_expected():
    small = estimate("train", "tiny:sd1", resolution=32)
    big = estimate("train", "tiny:sd1", resolution=64, batch=2)
    assert big.parts["step"] > 3 * small.parts["step"]  # 4x the pixels, 2x the batch
    assert big.parts["weights"] == small.parts["weights"]
    ckpt = estimate("train", "tiny:sd1", resolution=64, batch=2, gradient_checkpointing=True)
    assert ckpt.parts["step"] < big.parts["step"]
    # Full-size weights from the configs, no memory spent: SD 1.5 bf16 ~ 1.07B parameters x 2 bytes.
    full = estimate("sample", "random:sd1:full", resolution=64, dtype=torch.bfloat16, method="cmlora", n_loras=4)
    assert 1.9 < full.parts["weights"] / GIB < 2.1
    # CMLoRA: one deep feature per LoRA, [2 (CFG) x 640 x 8 x 8] bf16 at 64 px.
    assert full.parts["cache"] == 4 * 2 * 640 * 8 * 8 * 2
    assert estimate("sample", "stabilityai/unknown-model", resolution=32) is None  # no configs offline: no estimate


def _images(folder: Path, n: int, res: int) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red circle")
    return folder


_MEASURE = """
import resource, sys
from lorakit.cli import main
rc = main(sys.argv[1:])
print("PEAK_RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
sys.exit(rc)
"""


def _peak_rss(argv: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split("PEAK_RSS")[-1])


@pytest.mark.slow
@pytest.mark.parametrize("base,res", [("tiny:sd1", 64), ("random:sd1:mid", 64)])
def test_train_estimate_within_factor_of_measured_rss(tmp_path, base, res):
    data = _images(tmp_path / "img", 2, res)
    measured = _peak_rss(["train", "blockwise", f"base_model={base}", f"data.path={data}", f"output_dir={tmp_path / 'o'}",
                          "max_steps=2", "logging=none", "checkpointing_steps=0", "checkpoint_at_end=false",
                          f"data.resolution={res}", "memory_check=false"])
    est = estimate("train", base, resolution=res).total
    assert 1 / FACTOR <= measured / est <= FACTOR, (measured / 2**20, est / 2**20)


@pytest.mark.slow
def test_sample_estimate_within_factor_of_measured_rss(tmp_path):
    from lorakit.adapters.io import save_adapter
    from lorakit.models import sized_pipeline
    from lorakit.testing import random_adapter

    files = []
    for seed in range(2):
        files.append(tmp_path / f"a{seed}.safetensors")
        save_adapter(random_adapter(sized_pipeline("sd1", "mid"), seed=seed), files[-1])
    measured = _peak_rss(["sample", "--base", "random:sd1:mid", "--adapters", *map(str, files), "--method", "composite",
                          "--prompt", "a cat", "--steps", "2", "--size", "128", "--out", str(tmp_path / "s"),
                          "--no-memory-check"])
    est = estimate("sample", "random:sd1:mid", resolution=128, n_loras=2, method="composite",
                   adapter_bytes=sum(f.stat().st_size for f in files)).total
    assert 1 / FACTOR <= measured / est <= FACTOR, (measured / 2**20, est / 2**20)


@pytest.mark.slow  # 8.9 s of CPU in the fast suite (2026-12-03, one thread, loaded machine)
def test_trainer_refuses_with_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    data = _images(tmp_path / "img", 2, 32)
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": GIB // 4)
    common = ["train", "blockwise", "base_model=random:sd1:mid", f"data.path={data}", f"output_dir={tmp_path / 'o'}",
              "max_steps=1", "logging=none", "checkpointing_steps=0", "data.resolution=32"]
    assert main(common) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train needs ~" in err and "0.2 GiB free" in err and "memory_check=false" in err
    assert not (tmp_path / "o").exists()  # refused before anything was loaded or written
    from lorakit.errors import run_guarded
    from lorakit.training.blockwise import main as trainer_main

    # train_blockwise.py: the same one line, exit 2 (its entry point wraps main in the same error boundary)
    assert run_guarded(lambda: trainer_main(common[2:]), "train_blockwise.py") == 2
    monkeypatch.setattr(memory, "estimate", lambda *a, **k: pytest.fail("memory_check=false: no estimate"))
    assert main(common + ["memory_check=false"]) == 0  # the override
    assert (tmp_path / "o" / "lora.safetensors").exists()
    monkeypatch.setattr(memory, "estimate", lambda *a, **k: pytest.fail("tiny: bases are not traced"))
    assert main([*common[:2], "base_model=tiny:sd1", *common[3:], "output_dir=" + str(tmp_path / "t")]) == 0


def test_sample_and_fuse_refuse_and_override(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 1024)
    fake = tmp_path / "x.safetensors"
    fake.write_bytes(b"")
    assert main(["sample", "--base", "random:sd1:mid", "--adapters", str(fake), "--prompt", "a", "--out",
                 str(tmp_path / "s")]) == 2
    assert "sample needs ~" in capsys.readouterr().err
    assert main(["fuse", "--method", "gradient", "--base", "random:sd1:mid", "--adapters", str(fake), str(fake),
                 "--out", str(tmp_path / "f")]) == 2
    assert "fuse-gradient needs ~" in capsys.readouterr().err
    # The override, and a tiny: base, pass without an estimate (the empty adapter file then fails: exit 2).
    monkeypatch.setattr(memory, "estimate", lambda *a, **k: pytest.fail("no estimate expected"))
    assert main(["sample", "--base", "random:sd1:mid", "--adapters", str(fake), "--prompt", "a", "--out",
                 str(tmp_path / "s"), "--no-memory-check"]) == 2
    assert main(["sample", "--base", "tiny:sd1", "--adapters", str(fake), "--prompt", "a", "--out",
                 str(tmp_path / "s")]) == 2


@pytest.mark.parametrize("argv, stage", [
    (["train", "edlora", "concept.init_word=cat", "concept.placeholder=<TOK>"], "edlora"),
    (["train", "lorarar", "synthetic.content=1", "synthetic.style=1"], "lorarar"),
    (["fuse", "--method", "ziplora"], "ziplora"),
])
def test_every_heavy_command_refuses_before_loading(tmp_path, monkeypatch, capsys, argv, stage):
    """The trainers and fuse methods not covered above say what they need, in one line, before the base loads."""
    import lorakit.models

    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": GIB // 4)
    monkeypatch.setattr(lorakit.models, "load_base", lambda *a, **k: pytest.fail("loaded the base"))
    if argv[0] == "train":
        data = _images(tmp_path / "img", 2, 32)
        for cap in data.glob("*.txt"):
            cap.write_text("a photo of <TOK>")
        argv = argv + ["base_model=random:sd1:mid", f"data.path={data}", f"output_dir={tmp_path / 'o'}",
                       "max_steps=1", "logging=none", "checkpointing_steps=0", "data.resolution=32"]
    else:
        fake = tmp_path / "x.safetensors"
        fake.write_bytes(b"")
        argv = argv + ["--base", "random:sd1:mid", "--adapters", str(fake), str(fake), "--out", str(tmp_path / "f.safetensors")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{stage} needs ~" in err and "0.2 GiB free" in err, err


@pytest.mark.slow  # 9.0 s of CPU in the fast suite (2026-12-03, one thread, loaded machine)
def test_fusion_layers_read_from_the_files_count_locon_convs(tmp_path, sd1_pipe):
    """Gradient fusion's estimate takes its layers from the adapter files: a LoCon's 3x3 convs are unfolded
    (in * 9 wide) and raise the Gram and weight-copy parts over a LoRA's; the ranks of two files add up."""
    from lorakit.adapters.io import save_adapter
    from lorakit.fusion.gradient_memory import fusion_layers
    from lorakit.testing import random_adapter

    files = {}
    for net in ("lora", "locon"):
        files[net] = [tmp_path / f"{net}{i}.safetensors" for i in range(2)]
        for i, f in enumerate(files[net]):
            save_adapter(random_adapter(sd1_pipe, network=net, rank=4, conv_rank=4, conv_alpha=4, seed=i), f)
    lora, locon = fusion_layers(files["lora"]), fusion_layers(files["locon"])
    assert all(layer.rank == 8 for layer in lora + locon)  # 4 + 4 from the two files
    assert not any(layer.kernel for layer in lora) and any(layer.kernel for layer in locon)
    conv = next(layer for layer in locon if layer.kernel)
    module = sd1_pipe.unet.get_submodule(conv.key.split(".", 1)[1])
    assert conv.in_flat == module.in_channels * 9 and conv.out == module.out_channels
    est = {net: estimate("fuse-gradient", "random:sd1:mid", resolution=64, n_loras=2, layers=layers)
           for net, layers in (("lora", lora), ("locon", locon))}
    assert est["locon"].parts["gram"] > est["lora"].parts["gram"]
    assert est["locon"].parts["copies"] > est["lora"].parts["copies"]
    assert est["locon"].parts["capture"] > 0 == est["lora"].parts["capture"]
    # --ridge auto keeps held-out Grams beside the fit ones: twice the Gram part
    fixed = estimate("fuse-gradient", "random:sd1:mid", resolution=64, n_loras=2, layers=locon, heldout=False)
    assert est["locon"].parts["gram"] == 2 * fixed.parts["gram"]
    # a conv wider than max_conv_dim is solved in its LoRA subspace: an R x R Gram, far smaller
    small = estimate("fuse-gradient", "random:sd1:mid", resolution=64, n_loras=2, layers=locon, max_conv_dim=0)
    assert small.parts["gram"] < est["locon"].parts["gram"]


@pytest.mark.slow
def test_sd15_locon_fusion_estimate_counts_what_was_measured():
    """SD 1.5 size, two rank-4 LoCons, --ridge auto (bf16): the estimate holds the parts the measured run held
    (tools/bench_scale.py, docs/performance.md): fit + held-out Grams of the UNet stage (~7 GiB) and two copies
    of the adapted weights (~3.2 GiB), over 13 GiB in all; a fixed ridge drops the held-out half."""
    auto = estimate("fuse-gradient", "random:sd1:full", resolution=64, n_loras=2, batch=8, dtype=torch.bfloat16,
                    conv=True, cfg=False)
    fixed = estimate("fuse-gradient", "random:sd1:full", resolution=64, n_loras=2, batch=8, dtype=torch.bfloat16,
                     conv=True, cfg=False, heldout=False)
    assert 6.5 < auto.parts["gram"] / GIB < 7.5 and 3.0 < auto.parts["copies"] / GIB < 3.4
    assert auto.total / GIB > 13 and auto.total - fixed.total == auto.parts["gram"] // 2


@pytest.mark.slow
@pytest.mark.parametrize("argv, stage", [
    (["fuse", "--method", "gradient", "--dtype", "bfloat16"], "fuse-gradient"),
    (["fuse", "--method", "ziplora", "--dtype", "bfloat16"], "ziplora"),
])
def test_sdxl_stages_that_cannot_fit_24gb_refuse_before_loading(tmp_path, monkeypatch, capsys, argv, stage):
    """SDXL size on a 24 GB machine (22 GiB free): gradient fusion (its Gram matrices) and ZipLoRA (a training
    step over both reference halves at 1024 px) are refused from the estimate, before the base is built."""
    import re

    import lorakit.models

    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 22 * GIB)
    monkeypatch.setattr(lorakit.models, "load_base", lambda *a, **k: pytest.fail("loaded the base"))
    fake = tmp_path / "x.safetensors"
    fake.write_bytes(b"")
    assert main(argv + ["--base", "random:sdxl:full", "--adapters", str(fake), str(fake), "--out",
                        str(tmp_path / "f.safetensors")]) == 2
    # transformers' own notices (e.g. "requires torchvision") print when it is first imported in this process
    err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines()
                    if not line.startswith("[transformers]"))
    assert len(err.splitlines()) == 1 and f"{stage} needs ~" in err and "22.0 GiB free" in err, err
    assert float(re.search(r"needs ~([\d.]+) GiB", err).group(1)) > 24


def test_small_base_folders_are_not_traced_real_size_ones_are(tmp_path):
    from lorakit.memory import SMALL_BASE_BYTES, worth_checking
    from lorakit.toyworld.v2.models import DEFAULT_BASE

    assert not worth_checking(DEFAULT_BASE)  # the bundled toy base: 12 MB of weights
    small = tmp_path / "small" / "unet"
    small.mkdir(parents=True)
    (small / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 1024)
    assert not worth_checking(small.parent)
    big = tmp_path / "big" / "unet"
    big.mkdir(parents=True)
    with open(big / "diffusion_pytorch_model.safetensors", "wb") as f:  # sparse: no disk spent
        f.truncate(SMALL_BASE_BYTES + 1)
    assert worth_checking(big.parent)
    assert worth_checking("random:sd1:mid") and not worth_checking("tiny:sd1")
