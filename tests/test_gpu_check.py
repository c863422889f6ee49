"""tools/gpu_check.sh / gpu_check.py: the FLOP count behind MFU, and the whole check's --dry-run on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bf16_peak_and_sd15_flops():
    import gpu_check

    assert gpu_check.bf16_peak("NVIDIA H100 PCIe") == 756e12 and gpu_check.bf16_peak("NVIDIA H200") == 989e12
    assert gpu_check.bf16_peak("some other GPU") is None
    # SD 1.5's UNet forward at 512 px is ~0.8 TFLOP; with frozen weights the backward costs about one forward more.
    tflop = gpu_check.unet_train_flops("sd15", 1, 512, 4) / 1e12
    assert 1.4 < tflop < 2.2


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    checks = {r["check"]: r for r in rows}
    assert checks["cuda_tests"]["collected"] >= 5
    assert {"env", "train_ratio", "train_edlora_ratio", "sample_ratio", "multi_gpu", "total"} <= checks.keys()
    assert not any("error" in r for r in rows), rows
    assert checks["total"]["dry_run"] is True


def test_gpu_check_calls_fit_bench_scale_signatures():
    """gpu_check.py reuses bench_scale's helpers: every ``bench_scale.f(...)`` call in it binds to f's current
    signature (a changed signature once failed the GPU check's dry run in CI with a TypeError)."""
    import ast
    import inspect

    import bench_scale

    tree = ast.parse((ROOT / "tools" / "gpu_check.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and isinstance(n.func.value, ast.Name) and n.func.value.id == "bench_scale"]
    assert calls
    for call in calls:
        sig = inspect.signature(getattr(bench_scale, call.func.attr))
        sig.bind(*[None] * len(call.args), **{k.arg: None for k in call.keywords})
