"""``lorakit demo`` on toy world v2 (the default): the prompt, the ground-truth rows, the v2 oracle's verdicts, the
Wilson intervals of the table, bad concept names; a whole run on tiny settings is marked slow (it trains two
2-step LoRAs on the v2 base). Quality numbers are not asserted here (docs/toyworld_v2.md has a real run's)."""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch

from lorakit.cli import main
from lorakit.toyworld.demo import get_world, method_ids, target_ids

QUICK = ["--steps", "2", "--k", "1", "--sample-steps", "4", "--threads", "1", "--quiet"]


def test_v2_is_the_default_world_and_its_prompt_is_the_recipes_caption_form():
    import argparse

    from lorakit.toyworld.v2.composition import training_captions

    from lorakit.commands.demo import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([])
    assert args.world == "v2" and args.character is None and args.style is None and args.scale is None
    w = get_world("v2")
    assert (w.default_character, w.default_second, w.default_scale) == ("kwibbit", "nocturo", 0.8)
    assert w.prompt("kwibbit", "nocturo") == "kwibbit frog, nocturo night background"
    assert "kwibbit frog, white plain background" in training_captions("kwibbit", 40)  # as trained
    assert any(c.endswith(", nocturo night background") for c in training_captions("nocturo", 10))
    prompt = w.prompt("kwibbit", "inkvel")
    assert prompt == "kwibbit frog, white plain background, inkvel outline style"
    assert all(c.endswith(", inkvel outline style") for c in training_captions("inkvel", 10))
    fuse, held = w.fusion_prompts("inkvel")
    assert len(fuse) == 4 and len(held) == 2 and not set(fuse) & set(held)


def test_lorakit_row_is_the_benchmarks_method_and_only_in_v2(monkeypatch):
    """The v2 demo ends with lorakit's own method, sampled as the benchmark's ``delta-masked-classes-ubase``
    (the same sampler settings and adapter kinds); v1's prompts have no class words, so v1 has no such row."""
    import bench_composition as bench

    from lorakit.toyworld.demo import DemoSettings
    from lorakit.toyworld.demo_rows import ADAPTER_ROWS, RowRunner

    v2, v1 = method_ids("kwibbit", "nocturo"), method_ids("frog", "ink", "v1")
    assert v2 == ["base", "kwibbit_only", "nocturo_only", "merge", "switch", "composite", "cmlora",
                           "gradient", "weighted", "delta-masked-classes-ubase"]
    assert "delta-masked-classes-ubase" not in v1 and "delta-masked-classes-ubase" in ADAPTER_ROWS
    seen = {}
    monkeypatch.setattr("lorakit.toyworld.demo_rows.generate",
                        lambda pipe, ads, settings, prompt, neg, seeds, kinds=None: seen.update(
                            settings=settings, kinds=kinds, prompt=prompt) or ([None] * len(seeds), {}))
    s = DemoSettings(character="kwibbit", second="nocturo", scale=0.8)
    runner = RowRunner(s, {}, "kwibbit frog, nocturo night background", get_world("v2"))
    runner.__dict__.update(pipe=object(), ads=[])  # no models: only the settings the row passes on
    gen, info = runner.setup("delta-masked-classes-ubase")
    assert gen([0, 1]) == [None, None]
    want = bench.SAMPLER_SETTINGS["delta-masked-classes-ubase"]
    assert {k: getattr(seen["settings"], k) for k in want} == want
    assert (seen["settings"].steps, seen["settings"].cfg) == (s.sample_steps, s.guidance)
    assert seen["kinds"] == ["character", "background"] == info["kinds"]


def test_v2_target_rows_are_64px_ground_truth_the_oracle_reads():
    w, seeds = get_world("v2"), [0, 1, 2, 3]
    for second in ("nocturo", "inkvel"):
        got = {}
        for row in target_ids("kwibbit", second):
            images = w.target_images(row, "kwibbit", second, seeds)
            assert [im.size for im in images] == [(64, 64)] * 4
            got[row] = w.score(images, ["kwibbit", second]).rates
        assert got["kwibbit_target"] == {"kwibbit": 1.0, second: 0.0}
        assert got[f"{second}_target"] == {"kwibbit": 0.0, second: 1.0}
    assert got_default_pair(w, seeds) == {"kwibbit": 1.0, "nocturo": 1.0}  # the demo's pair, both in one picture
    # (kwibbit under inkvel's outlines is the oracle's weak spot, docs/toyworld_v2.md: not asserted)
    with pytest.raises(ValueError, match="unknown target row"):
        w.target_images("frog_target", "kwibbit", "inkvel", seeds)


def got_default_pair(w, seeds):
    return w.score(w.target_images("target", "kwibbit", "nocturo", seeds), ["kwibbit", "nocturo"]).rates


def test_table_rates_carry_wilson_intervals():
    from lorakit.eval.stats import wilson
    from lorakit.toyworld.demo_report import table_rows

    report = {"concepts": {"character": {"name": "kwibbit"}, "second": {"name": "inkvel"}},
              "rows": [{"method": "merge", "kind": "sampling", "s_per_image": 1.0, "setup_s": 0.0,
                        "probs": [[0.9, 0.2], [0.6, 0.7], [0.1, 0.8], [0.4, 0.3]]}]}
    head, row = table_rows(report)
    assert head[2:5] == ["kwibbit rate", "inkvel rate", "both rate"]
    lo, hi = wilson(2, 4)
    assert row[2] == row[3] == f"0.50 [{lo:.2f}, {hi:.2f}]"
    lo, hi = wilson(1, 4)
    assert row[4] == f"0.25 [{lo:.2f}, {hi:.2f}]"


@pytest.fixture(scope="module")
def v2_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo2")
    out, loras = root / "out", root / "loras"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", *QUICK, "--out", str(out), "--lora-dir", str(loras)]) == 0
    return out, loras, json.loads((out / "report.json").read_text()), printed.getvalue()


@pytest.mark.slow
def test_v2_run_has_every_row_enlarged_images_and_the_oracles_verdicts(v2_run):
    from PIL import Image

    from lorakit.toyworld.v2.oracle import Oracle

    out, loras, report, printed = v2_run
    assert report["settings"]["world"] == "v2" and report["settings"]["scale"] == 0.8
    assert report["prompt"] == "kwibbit frog, nocturo night background"
    assert [r["method"] for r in report["rows"]] == (target_ids("kwibbit", "nocturo")
                                                    + method_ids("kwibbit", "nocturo"))
    html = (out / "report.html").read_text()
    assert "width:192px" in html and (out / "grid.png").is_file()
    oracle = Oracle.load()
    for row in report["rows"]:
        images = [Image.open(out / rel).convert("RGB") for rel in row["images"]]
        for im, big in zip(images, row["images_large"]):
            large = Image.open(out / big).convert("RGB")
            assert im.size == (64, 64) and large.size == (192, 192)
            assert large.resize((64, 64), Image.NEAREST).tobytes() == im.tobytes()
            assert f'src="{big}"' in html
        s = oracle.score(images, ["kwibbit", "nocturo"])
        assert row["character_rate"] == s.rates["kwibbit"] and row["second_rate"] == s.rates["nocturo"]
        assert torch.allclose(torch.tensor(row["probs"]), s.probs, atol=1e-6)
        assert row["wilson95"]["character"]["k"] == round(row["character_rate"] * len(images))
        assert row["wilson95"]["both"]["n"] == len(images)
        for probs in row["probs"]:
            mark = ["\u2713" if p >= 0.5 else "\u2717" for p in probs]
            assert f'<div class="v">kwibbit {mark[0]} nocturo {mark[1]}</div>' in html
    paths = re.findall(r"(/[^\s'\"(),]+\.safetensors)", printed)
    assert paths and all(Path(p).is_file() for p in paths), printed
    assert {Path(v["path"]).parent for v in report["loras"].values()} == {loras}


@pytest.mark.slow
def test_rows_sampled_in_two_processes_are_the_images_of_one(v2_run, tmp_path):
    """--jobs 2 samples composite / cmlora / lorakit's delta in a second process (here one that has just trained a LoRA),
    and the base row and the first-saved LoRA's row while the other LoRA still trains: every image the same as one
    process makes from the same LoRAs, byte for byte."""
    _, loras, _, _ = v2_run
    reports = {}
    for jobs, lora_dir in (("1", loras), ("2", tmp_path / "fresh")):  # fresh: both LoRAs train in the pool first
        out = tmp_path / f"jobs{jobs}"
        assert main(["demo", *QUICK, "--k", "2", "--jobs", jobs, "--out", str(out), "--lora-dir", str(lora_dir)]) == 0
        reports[jobs] = json.loads((out / "report.json").read_text())
    assert not any(v["cached"] for v in reports["2"]["loras"].values())
    one, two = reports["1"], reports["2"]
    assert (one["settings"]["jobs"], two["settings"]["jobs"]) == (1, 2)
    assert [r["method"] for r in one["rows"]] == [r["method"] for r in two["rows"]]
    for a, b in zip(one["rows"], two["rows"]):
        assert a["images"] == b["images"] and a["probs"] == b["probs"]
        for rel in a["images"]:
            assert (tmp_path / "jobs1" / rel).read_bytes() == (tmp_path / "jobs2" / rel).read_bytes(), rel


@pytest.mark.slow
def test_v2_rerun_reuses_the_loras_and_cleans_its_stale_images(v2_run):
    out, loras, first, _ = v2_run
    mtimes = {n: Path(v["path"]).stat().st_mtime_ns for n, v in first["loras"].items()}
    assert main(["demo", *QUICK, "--seed", "7", "--out", str(out), "--lora-dir", str(loras)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert all(v["cached"] for v in report["loras"].values())
    assert {n: Path(v["path"]).stat().st_mtime_ns for n, v in report["loras"].items()} == mtimes
    assert all(not (out / rel).exists() for r in first["rows"] for rel in r["images"] + r["images_large"])
    assert all((out / rel).is_file() for r in report["rows"] for rel in r["images"] + r["images_large"])
    assert sorted(p.name for p in (out / "images").glob("*.png")) == sorted(
        Path(rel).name for r in report["rows"] for rel in r["images"])


def test_grid_png_shows_each_image_enlarged_with_its_verdict_marks(tmp_path):
    from PIL import Image

    from lorakit.toyworld.demo_report import GRID_COLOURS, grid_image

    (tmp_path / "images").mkdir()
    rows = []
    for name, colour, probs in (("a", (0, 0, 255), [[0.9, 0.1]]), ("b", (255, 255, 0), [[0.2, 0.7]])):
        Image.new("RGB", (64, 64), colour).save(tmp_path / "images" / f"{name}.png")
        rows.append({"method": name, "images": [f"images/{name}.png"], "probs": probs})
    grid = grid_image({"settings": {"image_size": 64}, "rows": rows}, tmp_path).convert("RGB")
    cell_h = 128 + 6 + 4
    assert grid.size == (104 + 130, 2 * cell_h)
    assert grid.getpixel((104 + 64, 2 + 64)) == (0, 0, 255)  # row a's image, 2x
    assert grid.getpixel((104 + 64, cell_h + 2 + 64)) == (255, 255, 0)
    mark_y = 2 + 128 + 4
    assert grid.getpixel((104 + 20, mark_y)) == GRID_COLOURS[True]  # row a: character found, style not
    assert grid.getpixel((104 + 64 + 20, mark_y)) == GRID_COLOURS[False]
    assert grid.getpixel((104 + 20, cell_h + mark_y)) == GRID_COLOURS[False]
    assert grid.getpixel((104 + 64 + 20, cell_h + mark_y)) == GRID_COLOURS[True]


def test_grid_labels_wrap_after_hyphens_to_fit_the_label_column():
    from PIL import Image, ImageDraw

    from lorakit.toyworld.demo_report import _wrap

    draw = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    lines = _wrap(draw, "delta-masked-classes-ubase", 96)
    assert len(lines) >= 2 and "".join(lines) == "delta-masked-classes-ubase"
    assert all(draw.textlength(line) <= 96 for line in lines)
    assert _wrap(draw, "kwibbit_only", 96) == ["kwibbit_only"]


@pytest.mark.parametrize("second,prompt", [
    ("hattock", "kwibbit frog, hattock hat, white plain background"),
    ("nocturo", "kwibbit frog, nocturo night background"),
    ("inkvel", "kwibbit frog, white plain background, inkvel outline style"),
])
def test_v2_second_concept_of_any_kind_gets_its_scene_prompt_and_targets(second, prompt):
    """An object or a background is composed like a style: the benchmark's scene caption, and ground truth that
    shows the second concept without the character and the whole scene, as the oracle reads them."""
    from lorakit.toyworld.v2.composition import composition_sets

    w, seeds = get_world("v2"), [0, 1, 2]
    assert w.prompt("kwibbit", second) == prompt
    bench = {s["id"]: s["prompt"] for s in composition_sets(sizes=(2,))}
    assert bench[f"n2-kwibbit-{second}"] == prompt  # the same caption the composition benchmark measures
    alone = w.score(w.target_images(f"{second}_target", "kwibbit", second, seeds), ["kwibbit", second]).rates
    assert alone == {"kwibbit": 0.0, second: 1.0}
    if second != "inkvel":  # (kwibbit under inkvel's outlines is the oracle's weak spot)
        assert w.score(w.target_images("target", "kwibbit", second, seeds), ["kwibbit", second]).all_rate == 1.0


def test_cli_object_and_background_choose_the_second_concept_and_its_kind():
    import argparse

    from lorakit.commands.demo import add_arguments
    from lorakit.toyworld.demo import DemoSettings, _check_second

    p = argparse.ArgumentParser()
    add_arguments(p)
    for flag in ("--style", "--object", "--background"):
        assert getattr(p.parse_args([flag, "x"]), flag[2:]) == "x"
    with pytest.raises(SystemExit):  # one second concept per run
        p.parse_args(["--object", "hattock", "--style", "inkvel"])
    w = get_world("v2")
    assert _check_second(w, DemoSettings(second="nocturo")) == "nocturo"  # any kind when none is named
    assert _check_second(w, DemoSettings(second="hattock", second_kind="object")) == "hattock"
    with pytest.raises(ValueError, match="--style 'hattock'"):
        _check_second(w, DemoSettings(second="hattock", second_kind="style"))


@pytest.mark.slow
def test_two_processes_train_the_same_loras_as_one(tmp_path):
    """--train-jobs 2 (both LoRAs at once, one process each) trains the weights one process trains, bit for bit."""
    from lorakit.fileio import load_safetensors

    w = get_world("v2")
    one = w.train_loras("zorbo", "nocturo", tmp_path / "one", train_steps=2, jobs=1)
    first = []  # while_training: called once, in this process, as soon as the first LoRA is saved
    two = w.train_loras("zorbo", "nocturo", tmp_path / "two", train_steps=2, jobs=2,
                        while_training=lambda name, path: first.append((name, path, Path(path).is_file())))
    assert len(first) == 1 and first[0][0] in two and first[0][1:] == (two[first[0][0]]["path"], True)
    for name in ("zorbo", "nocturo"):
        a, b = Path(one[name]["path"]), Path(two[name]["path"])
        ta, tb = load_safetensors(a)[0], load_safetensors(b)[0]
        assert a.name == b.name and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        assert not two[name]["cached"] and two[name]["seconds"] > 0
    again = w.train_loras("zorbo", "nocturo", tmp_path / "two", train_steps=2, jobs=2,
                          while_training=lambda name, path: first.append(name))
    assert all(v["cached"] and v["seconds"] == 0 for v in again.values()) and len(first) == 1  # nothing trained
