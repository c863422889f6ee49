"""tools/bench_scale.py: the ratio and growth rows it derives from its runs."""

from __future__ import annotations

import json

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
        _row("composite", n_loras=16, step_s=9.0, total_s=99.0, steps=30),  # nor is an image of other steps
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
    # one series per value of the other axes: composite against resolution at N = 4, none at N = 2 (one point)
    res_composite = [(r["x"], r["at"], r["time_x"]) for r in curves if r["stage"] == "composite" and r["axis"] == "resolution"]
    assert res_composite == [(128, {"rank": 4, "n_loras": 4}, 1.0), (256, {"rank": 4, "n_loras": 4}, 2.25)]


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
    assert ratios["train_gc"]["vs"] == "train" and ratios["train_gc"]["peak_rss_ratio"] == round(2700 / 2836, 3)  # / the mean of the repeats


def test_plan_shares_one_process_per_size_for_the_base_preserving_stages():
    args = bench.parse_args(["--sizes", "sd15", "--stages", "train", "sample", "cmlora", "--n-loras", "4", "2",
                             "--shared"])
    procs = bench.plan(args)
    assert [len(points) for _, points in procs] == [1, 4]
    assert procs[0][1] == [{"one": "train", "resolution": 128, "rank": 4, "n_loras": 2}]
    assert [(p["one"], p["n_loras"]) for p in procs[1][1]] == [("sample", 4), ("cmlora", 4), ("sample", 2), ("cmlora", 2)]
    args = bench.parse_args(["--sizes", "sd15", "--stages", "composite", "cmlora", "--repeat", "2", "--shared"])
    # repeats of shared stages run in the one process, the arms alternating
    assert [[p["one"] for p in points] for _, points in bench.plan(args)] == [["composite", "cmlora"] * 2]
    args = bench.parse_args(["--sizes", "sd15", "--stages", "sample", "--repeat", "2", "--shared"])
    assert [len(points) for _, points in bench.plan(args)] == [2]  # --shared: the repeats interleave in one process


def test_plot_writes_a_png(tmp_path):
    import pytest

    pytest.importorskip("matplotlib")
    rows = [_row("sample", n_loras=n, step_s=float(n), total_s=float(n), peak_rss_mb=3000.0 + n) for n in (2, 4, 8)]
    png = bench.plot(bench.derived_rows(rows), tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no curve to draw"):  # one point per axis: a line, not a traceback
        bench.plot(bench.derived_rows(rows[:1]), tmp_path / "none.png")


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


def test_cmlora_pairs_with_composite_per_image_at_its_own_point():
    """CMLoRA / Composite by the whole image's seconds, paired run by run, at 64 px and N = 4; a 256 px train
    pair is paired with its own reference, not with the default point's."""
    rows = [_row("composite", resolution=64, n_loras=4, total_s=160.0, step_s=5.0),
            _row("cmlora", resolution=64, n_loras=4, total_s=32.0, step_s=0.9),
            _row("composite", resolution=64, n_loras=4, total_s=200.0, step_s=6.0),
            _row("cmlora", resolution=64, n_loras=4, total_s=50.0, step_s=1.0),
            _row("composite", resolution=64, n_loras=2, total_s=90.0, step_s=3.0),
            _row("train_ref", resolution=256, step_s=20.0), _row("train", resolution=256, step_s=15.0),
            _row("train_ref", resolution=256, step_s=10.0), _row("train", resolution=256, step_s=10.0),
            _row("train_ref", step_s=1.0)]
    out = bench.derived_rows(rows)
    paired = {r["stage"]: r for r in out if r["run"] == "paired_ratio"}
    assert paired["cmlora"]["vs"] == "composite" and paired["cmlora"]["time_ratios"] == [0.2, 0.25]
    assert paired["cmlora"]["n_loras"] == 4 and paired["cmlora"]["resolution"] == 64
    assert paired["train"]["time_ratios"] == [0.75, 1.0] and paired["train"]["resolution"] == 256
    ratio = [r for r in out if r["run"] == "ratio" and r["stage"] == "cmlora" and r.get("vs") == "composite"]
    assert [(r["n_loras"], r["time_ratio"]) for r in ratio] == [(4, round(41 / 180, 3))]


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


def test_markdown_tables_list_every_run_and_the_pairs():
    rows = [_row("composite", resolution=64, n_loras=4, total_s=160.0, step_s=5.0, steps=30, estimate_mb=2700.0),
            _row("cmlora", resolution=64, n_loras=4, total_s=32.0, step_s=0.9, steps=30),
            _row("composite", resolution=64, n_loras=4, total_s=200.0, step_s=6.0, steps=30),
            _row("cmlora", resolution=64, n_loras=4, total_s=50.0, step_s=1.0, steps=30),
            {"run": "ziplora", "size": "sd15", "resolution": 256, "rank": 4, "error": "timeout"},
            _row("fuse", resolution=64, n_loras=2, total_s=109.9, capture_s=45.5, solve_s=60.9, ridge="auto",
                 layers=192, fallback_layers=0)]
    text = bench.markdown(rows + bench.derived_rows(rows))
    assert text.count("| composite | 64 | 4 | 4 | ") == 2 and "160.0 /image of 30 steps" in text
    assert "| fuse | 64 | 2 | 4 | 109.9 total (capture 46, solve 61; ridge auto; 192 layers, 0 fallback) |" in text
    assert "**timeout**" in text
    assert "| cmlora / composite (total_s) | resolution 64, n_loras 4, rank 4 | 2 | [0.2, 0.25] | 0.225 (0.2-0.25) |" in text


def test_trainer_variants_pair_with_their_own_reference_loops():
    rows = [_row("train_ref_locon", step_s=10.0, peak_rss_mb=3000.0), _row("train_locon", step_s=8.0, peak_rss_mb=2900.0),
            _row("train_ref_locon", step_s=20.0, peak_rss_mb=3010.0), _row("train_locon", step_s=10.0, peak_rss_mb=2910.0),
            _row("train", step_s=5.0, peak_rss_mb=2800.0), _row("train_ref_edlora", step_s=4.0)]
    out = bench.derived_rows(rows)
    ratios = {(r["stage"], r["vs"]): r for r in out if r["run"] == "ratio" and "vs" in r}
    assert ratios[("train_locon", "train_ref_locon")]["time_ratio"] == 0.6  # 9 / 15
    assert ratios[("train_locon", "train")]["time_ratio"] == 1.8  # against the plain LoRA trainer too
    assert not any(r["stage"] == "train_edlora" for r in out if r["run"] == "ratio")  # no lorakit run to pair
    pairs = [r for r in out if r["run"] == "paired_ratio"]
    assert [(p["stage"], p["vs"], p["time_ratios"]) for p in pairs] == [("train_locon", "train_ref_locon", [0.8, 0.5])]
    assert "| train_locon / train_ref_locon (step_s) | resolution 128, rank 4 | 2 | [0.8, 0.5] |" in bench.markdown(
        rows + out)


def test_edlora_pairs_with_both_reference_loops():
    """ED-LoRA's step is compared with the plain recipe and with the recipe that encodes one caption copy per
    cross-attention layer (the method's own text-encoder work)."""
    rows = [_row("train_ref_edlora", step_s=4.0), _row("train_ref_edlora_layers", step_s=6.0),
            _row("train_edlora", step_s=5.0)]
    ratios = {(r["stage"], r["vs"]): r["time_ratio"] for r in bench.derived_rows(rows) if r["run"] == "ratio"
              and "vs" in r}
    assert ratios[("train_edlora", "train_ref_edlora")] == 1.25
    assert round(ratios[("train_edlora", "train_ref_edlora_layers")], 3) == 0.833


@pytest.mark.slow
def test_reference_loops_train_what_the_variants_train(tmp_path):
    """The reference loops of the trainer variants (tools/bench_train.py) on the tiny pipeline: LoCon's adapts the
    resnet convs, the gradient-checkpointing one turns diffusers' checkpointing on, ED-LoRA's trains LoRAs on both
    models' attention and only the two new embedding rows."""
    import argparse

    import bench_train
    import torch

    args = argparse.Namespace(device="cpu", dtype="fp32", rank=2, batch=1, warmup=0, steps=1, resolution=32)
    folder = tmp_path / "img"
    folder.mkdir()
    captions = bench_train.make_images(folder, 2, 32)
    torch.manual_seed(0)
    pipe = bench_train.make_pipe("tiny")
    bench_train.reference(args, pipe, folder, captions, network="locon", gradient_checkpointing=True)
    lora_convs = [n for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Conv2d) and "resnets" in n
                  and n.endswith("lora_A.default")]
    assert lora_convs and pipe.unet.is_gradient_checkpointing
    pipe = bench_train.make_pipe("tiny")
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    res = bench_train.reference_edlora(args, pipe, folder)
    emb = pipe.text_encoder.get_input_embeddings().weight.detach()
    new = pipe.tokenizer.convert_tokens_to_ids(["<cat1>", "<cat2>"])
    assert emb.shape[0] == before.shape[0] + 2 and res["step_s"] > 0
    assert torch.equal(emb[: before.shape[0]].to(before.dtype), before)  # every old row restored
    assert not torch.equal(emb[new[0]], emb[new[1]])  # both started as "cat"; a step moved them apart
    assert any("lora_A" in n for n, _ in pipe.text_encoder.named_parameters())
    assert not any("lora_A" in n for n, m in pipe.unet.named_modules() if "resnets" in n)
    pipe = bench_train.make_pipe("tiny")  # layer_copies: the text encoder sees one caption copy per cross-attention
    seen = []
    pipe.text_encoder.register_forward_hook(lambda module, inputs, out: seen.append(inputs[0].shape[0]))
    bench_train.reference_edlora(args, pipe, folder, layer_copies=True)
    assert seen == [16 * args.batch]  # the tiny UNet's 16 cross-attention layers, as lorakit's ED-LoRA encodes


def test_docs_tables_come_from_the_files_between_their_markers(tmp_path):
    """--derive FILES --docs MD: the runs of every file (their own derived rows left out and derived again), the
    N table of the sampling methods, written between the marker lines and nowhere else."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(json.dumps(_row(m, resolution=256, n_loras=n, steps=2, step_s=1.0, total_s=t,
                                            peak_rss_mb=2700.0 + n))
                           for m, n, t in (("composite", 2, 20.0), ("cmlora", 2, 15.0), ("composite", 4, 40.0))) + "\n")
    b.write_text(json.dumps(_row("cmlora", resolution=256, n_loras=4, steps=2, step_s=1.0, total_s=22.0)) + "\n"
                 + json.dumps({"run": "ratio", "size": "sd15", "stage": "cmlora", "time_ratio": 9.9}) + "\n")
    md = tmp_path / "perf.md"
    md.write_text("intro\n" + bench.MARKERS[0] + "old tables\n" + bench.MARKERS[1] + "after\n")
    assert bench.main(["--derive", str(a), str(b), "--docs", str(md)]) == 0
    text = md.read_text()
    assert text.startswith("intro\n" + bench.MARKERS[0]) and text.endswith(bench.MARKERS[1] + "after\n")
    assert "old tables" not in text and "9.9" not in text
    assert "| 256 px, 2-step image: s / peak RSS MiB | N = 2 | N = 4 |" in text
    assert "| composite | 20.0 / 2702 | 40.0 / 2704 |" in text and "| cmlora | 15.0 / 2702 | 22.0 / 3000 |" in text
    assert "| cmlora / composite | resolution 256, n_loras 4, rank 4 | 0.55 |" in text
    md.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no '<!-- tables"):
        bench.main(["--derive", str(a), "--docs", str(md)])


def test_ratios_pair_only_rows_of_one_bench_invocation():
    """Two arms run by different invocations (other days, other loads) give no ratio; each invocation's own
    pair does, and says which invocation it came from."""
    rows = [_row("composite", resolution=128, n_loras=4, total_s=380.0, step_s=12.6, steps=30, bench="b1"),
            _row("cmlora", resolution=128, n_loras=4, total_s=229.0, step_s=6.2, steps=30, bench="b2"),
            _row("composite", resolution=64, n_loras=4, total_s=160.0, step_s=5.0, steps=30, bench="b3"),
            _row("cmlora", resolution=64, n_loras=4, total_s=32.0, step_s=0.9, steps=30, bench="b3"),
            _row("composite", resolution=64, n_loras=4, total_s=200.0, step_s=6.0, steps=30, bench="b3"),
            _row("cmlora", resolution=64, n_loras=4, total_s=50.0, step_s=1.0, steps=30, bench="b3"),
            _row("composite", resolution=64, n_loras=4, total_s=100.0, step_s=3.0, steps=30, bench="b4")]
    out = bench.derived_rows(rows)
    ratios = [(r["resolution"], r["bench"], r["time_ratio"]) for r in out if r["run"] == "ratio"]
    assert ratios == [(64, "b3", round(41 / 180, 3))]  # not 128 px (b1 / b2), and b4's Composite not in the mean
    paired = [r for r in out if r["run"] == "paired_ratio"]
    assert len(paired) == 1 and paired[0]["bench"] == "b3" and paired[0]["time_ratios"] == [0.2, 0.25]
    text = bench.markdown(rows + out)
    assert "| cmlora / composite | resolution 64, n_loras 4, rank 4; run b3 | 0.228 |" in text
    # the curve across invocations stays (how the cost grows, each point its own runs)
    assert any(r["run"] == "curve" and r["stage"] == "composite" and r["x"] == 128 for r in out)


def test_each_invocation_stamps_its_rows(tmp_path, monkeypatch):
    """main() gives every row of one invocation the same ``bench`` id (the rows the child processes print, and
    the error rows of points that did not finish)."""
    seen = []

    def fake_run_process(args, size, points, env, out):
        seen.append(args.bench)
        return [{"run": p["one"], "size": size, "error": "timeout", "bench": args.bench} for p in points]

    monkeypatch.setattr(bench, "_run_process", fake_run_process)
    assert bench.main(["--sizes", "sd15", "--stages", "train_ref", "train"]) == 0
    assert len(seen) == 2 and seen[0] == seen[1] and seen[0].endswith(f"/{__import__('os').getpid()}")


def test_rows_of_a_stopped_point_carry_the_invocation():
    import os

    args = bench.parse_args(["--sizes", "tiny", "--timeout", "0"])  # the child is killed at once
    args.bench = "2026-12-03T18:00:00Z/1"
    rows = bench._run_process(args, "tiny", [{"one": "train", "resolution": 32, "rank": 4, "n_loras": 2}],
                              dict(os.environ), None)
    assert [(r["error"], r["bench"]) for r in rows] == [("timeout", "2026-12-03T18:00:00Z/1")]
    assert "n_loras" not in rows[0]  # a trainer has no N (the table showed N = 2 for a stopped trainer)
    assert "| train | 32 | - | 4 | **timeout** |" in bench.markdown(rows)
    rows = bench._run_process(args, "tiny", [{"one": "cmlora", "resolution": 32, "rank": 4, "n_loras": 4}],
                              dict(os.environ), None)
    assert rows[0]["n_loras"] == 4 and "| cmlora | 32 | 4 | 4 | **timeout** |" in bench.markdown(rows)


def test_warmup_steps_zero_runs_no_warmup_image(monkeypatch):
    """--warmup-steps 0: only the short and the long image run (a 10-minute hold fits one more image), the row
    says it was not warmed up, and the child process is told so (0 is not dropped as a false value)."""
    calls = []
    monkeypatch.setattr(bench, "_adapters", lambda pipe, work, n, rank: ["a.safetensors"] * n)
    monkeypatch.setattr(bench, "_patched_cli", lambda pipe, argv: calls.append(int(argv[argv.index("--steps") + 1])) or 10.0 * len(calls))

    class Pipe:
        def unload_lora_weights(self):
            pass

    args = bench.parse_args(["--sizes", "sd15", "--warmup-steps", "0", "--sample-steps", "1", "--sample-steps-long", "20"])
    args.n_loras, args.rank, args.resolution, args.dtype = 4, 4, 128, "bf16"
    res = bench._sample(args, Pipe(), Path("."), "composite")
    assert calls == [1, 20] and res["total_s"] == 20.0 and res["short_s"] == 10.0 and not res["warmed_up"]
    assert abs(res["step_s"] - 10.0 / 19) < 1e-9  # (t(20) - t(1)) / 19
    seen = []

    def popen(cmd, **kw):
        seen.append(cmd)
        raise OSError("not started")

    monkeypatch.setattr(bench.subprocess, "Popen", popen)
    with pytest.raises(OSError):
        bench._run_process(args, "sd15", [{"one": "composite", "resolution": 128, "rank": 4, "n_loras": 4}], {}, None)
    assert seen[0][seen[0].index("--warmup-steps") + 1] == "0"


@pytest.mark.slow
def test_edlora_reference_loop_trains_in_bf16(tmp_path):
    """The ED-LoRA reference in bf16 (the SD 1.5 bench's dtype): its trained embedding table is fp32, the text
    encoder bf16, and the step runs (it stopped with 'mixed dtype (CPU)' in the encoder's first layer norm); the
    two new rows move, the old rows stay."""
    import argparse

    import bench_train
    import torch

    args = argparse.Namespace(device="cpu", dtype="bf16", rank=2, batch=1, warmup=0, steps=1, resolution=32)
    folder = tmp_path / "img"
    folder.mkdir()
    bench_train.make_images(folder, 2, 32)
    torch.manual_seed(0)
    pipe = bench_train.make_pipe("tiny")
    res = bench_train.reference_edlora(args, pipe, folder)
    emb = pipe.text_encoder.get_input_embeddings().weight.detach()
    new = pipe.tokenizer.convert_tokens_to_ids(["<cat1>", "<cat2>"])
    assert res["step_s"] > 0 and emb.dtype == torch.float32
    assert all(m.weight.dtype == torch.bfloat16 for m in pipe.text_encoder.modules() if isinstance(m, torch.nn.LayerNorm))
    assert not torch.equal(emb[new[0]], emb[new[1]])
    ids = pipe.tokenizer("a photo of <cat1>", return_tensors="pt").input_ids
    assert pipe.text_encoder(ids)[0].dtype == torch.bfloat16


def test_n_table_keeps_each_invocation_apart():
    """A method's point from another invocation (another load) is not averaged into this one's N table."""
    rows = [_row(m, resolution=256, n_loras=n, steps=2, step_s=1.0, total_s=t, bench="b2")
            for m, n, t in (("composite", 2, 14.0), ("composite", 4, 25.0), ("composite", 8, 52.0))]
    rows.append(_row("composite", resolution=256, n_loras=4, steps=2, step_s=1.0, total_s=125.0, bench="b1"))
    text = bench.markdown(rows)
    assert "| 256 px, 2-step image (run b2): s / peak RSS MiB | N = 2 | N = 4 | N = 8 |" in text
    assert "| composite | 14.0 / 3000 | 25.0 / 3000 | 52.0 / 3000 |" in text and "75.0" not in text
