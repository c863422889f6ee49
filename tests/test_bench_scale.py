"""tools/bench_scale.py: the ratio and growth rows it derives from its runs."""

from __future__ import annotations

import bench_scale as bench
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_derived_rows():
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


def _row(run, **kw):
    row = {"run": run, "size": "sd15", "resolution": 128, "rank": 4, "unet_params_m": 860.0, "peak_rss_mb": 3000.0}
    row.update(kw)
    return row


def test_curve_rows_vary_one_axis_at_the_others_defaults():
    rows = [
        # sampling curves use the whole image's seconds (total_s), not the per-step marginal
        _row("composite", n_loras=2, step_s=-1.0, total_s=2.0, peak_rss_mb=3000.0),
        _row("composite", n_loras=4, step_s=9.0, total_s=4.0, peak_rss_mb=3100.0),
        _row("composite", n_loras=8, step_s=1.0, total_s=8.0, peak_rss_mb=3300.0),
        _row("composite", n_loras=4, resolution=256, step_s=9.0, total_s=9.0),  # not on the N axis (256 px)
        _row("train", step_s=5.0),
        _row("train", resolution=256, step_s=15.0, peak_rss_mb=3600.0),
        _row("train", rank=64, step_s=6.0, peak_rss_mb=3150.0),
    ]
    curves = [r for r in bench.derived_rows(rows) if r["run"] == "curve"]
    n_axis = [(r["x"], r["time_x"], r["peak_rss_x"]) for r in curves if r["stage"] == "composite" and r["axis"] == "n_loras"]
    assert n_axis == [(2, 1.0, 1.0), (4, 2.0, round(3100 / 3000, 3)), (8, 4.0, 1.1)]
    res_axis = [(r["x"], r["time_x"]) for r in curves if r["stage"] == "train" and r["axis"] == "resolution"]
    assert res_axis == [(128, 1.0), (256, 3.0)]
    rank_axis = [(r["x"], r["peak_rss_x"]) for r in curves if r["stage"] == "train" and r["axis"] == "rank"]
    assert rank_axis == [(4, 1.0), (64, 1.05)]
    assert not [r for r in curves if r["stage"] == "composite" and r["axis"] == "resolution"]  # one point only


def test_spread_rows_and_ratios_of_the_variants():
    rows = [_row("train_ref", step_s=10.0, peak_rss_mb=2831.0), _row("train_ref", step_s=12.0, peak_rss_mb=2841.0),
            _row("train", step_s=7.0, peak_rss_mb=2842.0), _row("train", step_s=8.0, peak_rss_mb=2830.0),
            _row("train_gc", step_s=9.0, peak_rss_mb=2700.0)]
    out = bench.derived_rows(rows)
    spread = {r["stage"]: r for r in out if r["run"] == "spread"}
    assert spread["train_ref"]["n"] == 2 and spread["train_ref"]["peak_rss_mb_min"] == 2831.0
    assert spread["train"]["peak_rss_mb_max"] == 2842.0 and spread["train"]["time_s_mean"] == 7.5
    assert "train_gc" not in spread  # one run
    ratios = {r["stage"]: r for r in out if r["run"] == "ratio"}
    assert ratios["train_gc"]["vs"] == "train" and ratios["train_gc"]["peak_rss_ratio"] == round(2700 / 2830, 3)


def test_plan_shares_one_process_per_size_for_the_base_preserving_stages():
    args = bench.parse_args(["--sizes", "sd15", "--stages", "train", "sample", "cmlora", "--n-loras", "4", "2",
                             "--shared"])
    procs = bench.plan(args)
    assert [len(points) for _, points in procs] == [1, 4]
    assert procs[0][1] == [{"one": "train", "resolution": 128, "rank": 4, "n_loras": 2}]
    assert [(p["one"], p["n_loras"]) for p in procs[1][1]] == [("sample", 4), ("cmlora", 4), ("sample", 2), ("cmlora", 2)]
    args = bench.parse_args(["--sizes", "sd15", "--stages", "sample", "--repeat", "2", "--shared"])
    assert [len(points) for _, points in bench.plan(args)] == [2]  # --shared: the repeats interleave in one process


def test_plot_writes_a_png(tmp_path):
    import pytest

    pytest.importorskip("matplotlib")
    rows = [_row("sample", n_loras=n, step_s=float(n), total_s=float(n), peak_rss_mb=3000.0 + n) for n in (2, 4, 8)]
    png = bench.plot(bench.derived_rows(rows), tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_repeats_interleave_the_arms_and_pair_their_ratios():
    args = bench.parse_args(["--sizes", "sd15", "--stages", "train_ref", "train", "--repeat", "3"])
    assert [points[0]["one"] for _, points in bench.plan(args)] == ["train_ref", "train"] * 3
    rows = [_row("train_ref", step_s=10.0, total_s=60.0, peak_rss_mb=2855.0),
            _row("train", step_s=5.0, total_s=40.0, peak_rss_mb=2795.0),
            _row("train_ref", step_s=4.0, total_s=30.0, peak_rss_mb=2856.0),
            _row("train", step_s=4.0, total_s=33.0, peak_rss_mb=2794.0)]
    paired = [r for r in bench.derived_rows(rows) if r["run"] == "paired_ratio"]
    assert len(paired) == 1 and paired[0]["time_ratios"] == [0.5, 1.0] and paired[0]["time_ratio_mean"] == 0.75
    assert paired[0]["total_ratios"] == [round(40 / 60, 3), 1.1] and paired[0]["peak_rss_mb_diff"] == [-60.0, -62.0]


def test_fusion_rows_count_layers_by_kind():
    import torch


    class Pipe:
        unet = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Conv2d(2, 2, 1),
                                    "c": torch.nn.Conv2d(2, 2, 3), "d": torch.nn.Conv2d(2, 2, 3)})

    layers = {"unet.a": {"method": "closed_form"}, "unet.b": {"method": "closed_form"},
              "unet.c": {"method": "closed_form", "space": "LoRA subspace (dim 8)"},
              "unet.d": {"method": "weighted_fallback"}}
    assert bench.layers_by_kind(Pipe(), layers) == {
        "linear": {"solved": 1, "subspace": 0, "fallback": 0}, "conv1x1": {"solved": 1, "subspace": 0, "fallback": 0},
        "conv": {"solved": 0, "subspace": 1, "fallback": 1}}


@pytest.mark.slow
def test_cmlora_flops_count_full_and_shallow_passes_of_the_plan():
    row = bench.cmlora_flops("sd1", "mid", 64, 4, 10)
    assert row["full_passes"] + row["shallow_passes"] == 40 and row["full_passes"] >= 4  # step 0: every cache
    assert 0 < row["shallow_pass_gflop"] < row["full_pass_gflop"]
    expected = (row["full_passes"] * row["full_pass_gflop"] + row["shallow_passes"] * row["shallow_pass_gflop"]) \
        / (40 * row["full_pass_gflop"])
    assert abs(row["cmlora_over_composite"] - expected) < 0.05  # the row's GFLOPs are rounded to 0.1


def test_rss_guard_stops_a_process_past_its_limit():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(200 * 2**20); time.sleep(20)"])
    guard = bench.RssGuard(proc, 100)
    assert proc.wait(timeout=15) != 0
    guard.stop()
    assert guard.tripped and guard.peak_mb > 100
