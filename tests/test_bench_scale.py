"""tools/bench_scale.py: the ratio and growth rows it derives from its runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "tools" / "bench_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_derived_rows():
    bench = _module()
    rows = [
        {"run": "train_ref", "size": "tiny", "step_s": 1.0, "peak_rss_mb": 500, "unet_params_m": 2.0},
        {"run": "train", "size": "tiny", "step_s": 2.0, "peak_rss_mb": 400, "unet_params_m": 2.0},
        {"run": "train", "size": "sd15", "step_s": 50.0, "peak_rss_mb": 4000, "unet_params_m": 860.0},
        {"run": "train_ref", "size": "sd15", "error": "timeout"},
    ]
    out = bench.derived_rows(rows)
    ratio = [r for r in out if r["run"] == "ratio"]
    assert ratio == [{"run": "ratio", "size": "tiny", "stage": "train", "time_ratio": 2.0, "peak_rss_ratio": 0.8}]
    growth = [r for r in out if r["run"] == "growth"]
    assert growth == [{"run": "growth", "size": "sd15", "stage": "train", "params_x": 430.0, "time_x": 25.0,
                       "peak_rss_x": 10.0}]
