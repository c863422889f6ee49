"""``lorakit demo --world v1`` on the bundled toy base with tiny settings (2 training steps, 1 image per method, 4 DDIM steps).

Checks the report files, that every method row is present, that report.json's rates are the oracle's on the saved
PNGs, that a second run reuses the cached LoRAs, and that bad --character / --style values fail naming the value.
Quality numbers are not asserted (2 training steps teach nothing; the base may be retrained).
"""

import json
from pathlib import Path

import pytest
import torch

from lorakit.cli import main
from lorakit.toyworld.demo import method_ids, target_ids
from lorakit.toyworld.demo_v1 import check_concept, demo_prompt

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--world", "v1", "--steps", "2", "--k", "1", "--sample-steps", "4", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    import contextlib
    import io

    root = tmp_path_factory.mktemp("demo")
    out, loras = root / "out", root / "loras"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", *QUICK, "--out", str(out), "--lora-dir", str(loras)]) == 0
    return out, loras, json.loads((out / "report.json").read_text()), printed.getvalue()


def test_prompt_is_the_training_caption_form():
    prompt = demo_prompt("frog", "ink")
    assert prompt == "kwibbit, white plain background, inkvel"
    frog_caps = {p.read_text().strip() for p in (REPO / "data/toy/frog").glob("*.txt")}
    ink_caps = {p.read_text().strip() for p in (REPO / "data/toy/ink").glob("*.txt")}
    assert "kwibbit, white plain background" in frog_caps  # character part, as trained
    assert all(c.endswith(", inkvel") for c in ink_caps)  # style trigger last, as trained
    assert check_concept("kwibbit", "character", "--character").name == "frog"


def test_report_files_and_every_method(demo_run):
    out, _, report, _ = demo_run
    for name in ("report.html", "report.md", "report.json"):
        assert (out / name).stat().st_size > 0
    expected = method_ids("frog", "ink", "v1")
    assert expected == ["base", "frog_only", "ink_only", "merge", "switch", "composite", "cmlora", "gradient",
                        "weighted"]
    assert target_ids("frog", "ink") == ["frog_target", "ink_target", "target"]
    assert [r["method"] for r in report["rows"]] == target_ids("frog", "ink") + expected
    assert report["prompt"] == "kwibbit, white plain background, inkvel"
    html, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    for row in report["rows"]:
        assert row["seeds"] == [0] and len(row["images"]) == 1 and len(row["probs"]) == 1
        assert row["kind"] == "target" or (row["s_per_image"] > 0 and row["setup_s"] >= 0)
        for rel, big in zip(row["images"], row["images_large"]):
            assert not Path(rel).is_absolute() and (out / rel).is_file() and (out / big).is_file()
            assert f'href="{rel}"' in html and f'src="{big}"' in html and f"]({rel})" in md and f"]({big})" in md
        assert f"<td>{row['method']}</td>" in html and f"| {row['method']} |" in md
    assert set(report["loras"]) == {"frog", "ink"}
    assert all(not v["cached"] for v in report["loras"].values())


def test_report_numbers_are_the_oracles_on_the_saved_pngs(demo_run):
    from PIL import Image

    from lorakit.toyworld.oracle import score

    out, _, report, _ = demo_run
    for row in report["rows"]:
        images = [Image.open(out / rel).convert("RGB") for rel in row["images"]]
        assert all(im.size == (32, 32) for im in images)
        for im, big in zip(images, row["images_large"]):  # the shown copy: the same pixels, 4x, nearest neighbour
            large = Image.open(out / big).convert("RGB")
            assert large.size == (128, 128) and large.resize((32, 32), Image.NEAREST).tobytes() == im.tobytes()
        s = score(images, ["frog", "ink"])
        assert row["character_rate"] == s.rates["frog"]
        assert row["second_rate"] == s.rates["ink"]
        assert row["both_rate"] == s.all_rate
        assert torch.allclose(torch.tensor(row["probs"]), s.probs, atol=1e-6)


def test_target_rows_are_ground_truth_the_oracle_recognises(demo_run):
    out, _, report, _ = demo_run
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["frog_target"]["character_rate"] == 1.0 and rows["frog_target"]["second_rate"] == 0.0
    assert rows["ink_target"]["second_rate"] == 1.0 and rows["ink_target"]["character_rate"] == 0.0
    assert rows["target"]["both_rate"] == 1.0


def test_printed_paths_exist(demo_run):
    import re

    out, _, _, printed = demo_run
    assert "final artifact:" in printed  # the trainer's summary, now naming the kept file
    paths = re.findall(r"(/[^\s'\"(),]+\.safetensors)", printed)
    assert paths and all(Path(p).is_file() for p in paths), printed


@pytest.fixture(scope="module")
def rerun(demo_run, tmp_path_factory):
    """A second run into a copy of the first one's folder, with another seed (other image names), one image and
    the rows ``base`` and ``merge``, plus a file lorakit did not write: ``(folder, report, LoRA mtimes before)``."""
    import shutil

    from lorakit.toyworld.demo import DemoSettings, run_demo

    out, loras, first, _ = demo_run
    mtimes = {n: Path(v["path"]).stat().st_mtime_ns for n, v in first["loras"].items()}
    again = tmp_path_factory.mktemp("rerun") / "out"
    shutil.copytree(out, again)
    (again / "images" / "mine.png").write_bytes(b"not lorakit's")
    report = run_demo(DemoSettings(out=str(again), k=1, seed=1, **_small(loras)), progress=False)
    return again, report, mtimes


def _small(loras):
    return dict(world="v1", lora_dir=str(loras), train_steps=2, sample_steps=4, methods=["base", "merge"])


def test_rerun_reuses_the_loras_and_removes_only_its_own_stale_images(demo_run, rerun):
    """The cached LoRAs are reused, not retrained nor rewritten; the first run's images go, a file lorakit did not
    write stays."""
    out, loras, first, _ = demo_run
    again, report, mtimes = rerun
    paths = {n: Path(v["path"]) for n, v in first["loras"].items()}
    assert all(p.parent == loras for p in paths.values())
    assert all(not (again / rel).exists() for r in first["rows"] for rel in r["images"] + r["images_large"])
    assert all((again / rel).is_file() for r in report["rows"] for rel in r["images"] + r["images_large"])
    assert (again / "images" / "mine.png").read_bytes() == b"not lorakit's"
    assert len(report["removed_stale"]) == 2 * len(first["rows"])
    for n, p in paths.items():
        assert report["loras"][n]["cached"] is True
        assert Path(report["loras"][n]["path"]) == p
        assert p.stat().st_mtime_ns == mtimes[n]  # not retrained, not rewritten
    assert len(list(loras.glob("*.safetensors"))) == 2


@pytest.mark.parametrize("world,option,value,expect", [
    ("v1", "--character", "ink", "is a held-out style, not a held-out character"),
    ("v1", "--character", "bob", "no such toy-world concept"),
    ("v1", "--character", "circle", "is a generic shape, not a held-out character"),
    ("v1", "--style", "frog", "is a held-out character, not a held-out style"),
    ("v2", "--character", "inkvel", "is a style (identity) of toy world v2, not a character identity"),
    ("v2", "--character", "frog", "is a character (class) of toy world v2, not a character identity"),
    ("v2", "--character", "bob", "no such toy world v2 concept"),
    ("v2", "--style", "kwibbit", "not a style identity; style identities: inkvel, pixlor"),
    ("v2", "--object", "inkvel", "is a style (identity) of toy world v2, not an object identity; object identities: "
     "hattock, shroomel"),
    ("v2", "--background", "night", "is a background (class) of toy world v2, not a background identity"),
    ("v1", "--object", "hattock", "the toy world v1 demo's second concept is a style"),
])
def test_bad_concept_fails_naming_it(world, option, value, expect, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["demo", option, value, *QUICK, "--world", world, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{option} {value!r}" in err and expect in err
    assert not out.exists()  # checked before anything is written or trained


def test_html_shows_each_images_verdict_by_concept_name(demo_run):
    out, _, report, _ = demo_run
    html = (out / "report.html").read_text()
    for row in report["rows"]:
        for probs in row["probs"]:
            mark = ["\u2713" if p >= 0.5 else "\u2717" for p in probs]  # check mark / ballot x
            assert f'<div class="v">frog {mark[0]} ink {mark[1]}</div>' in html


def test_a_batched_row_gives_each_seed_its_own_image(demo_run, rerun, tmp_path):
    """Rows are generated in one batch; image i must still be the image of seed i alone (up to float rounding):
    seeds 0 and 1 in one batch against the rerun's seed 1 alone."""
    import numpy as np
    from PIL import Image

    from lorakit.toyworld.demo import DemoSettings, run_demo

    _, loras, _, _ = demo_run
    one = rerun[0]
    run_demo(DemoSettings(out=str(tmp_path / "two"), k=2, seed=0, **_small(loras)), progress=False)
    for row in ("base", "merge"):
        batched = np.asarray(Image.open(tmp_path / "two" / "images" / f"{row}-s1.png"), dtype=int)
        alone = np.asarray(Image.open(one / "images" / f"{row}-s1.png"), dtype=int)
        assert np.abs(batched - alone).max() <= 2, row
        first = np.asarray(Image.open(tmp_path / "two" / "images" / f"{row}-s0.png"), dtype=int)
        assert np.abs(first - alone).max() > 2, row  # seeds 0 and 1 differ: the comparison can fail


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    """The demo's row builder on the v1 toy base with two random LoRAs large enough to change every image."""
    from lorakit.adapters.io import save_adapter
    from lorakit.sampling import load_pipeline
    from lorakit.testing import random_adapter
    from lorakit.toyworld.demo import DemoSettings, get_world
    from lorakit.toyworld.demo_rows import RowRunner

    world = get_world("v1")
    root = tmp_path_factory.mktemp("runner")
    pipe = load_pipeline(world.base(), "fp32")
    loras = {}
    for seed, name in enumerate(("frog", "ink"), start=1):
        path = root / f"{name}.safetensors"
        save_adapter(random_adapter(pipe, seed=seed, std=0.3), path)
        loras[name] = {"path": str(path)}
    s = DemoSettings(world="v1", character="frog", second="ink", scale=0.8, sample_steps=4)
    return RowRunner(s, loras, demo_prompt("frog", "ink"), world)


def _pixels(images):
    import numpy as np

    return np.stack([np.asarray(im, dtype=int) for im in images])


def test_merge_rows_on_added_deltas_are_peft_merge_up_to_rounding(runner):
    """A LoRA alone and merge are sampled with the deltas added to the weights; peft's unfused adapters at the same
    scale give the same images (within two uint8 levels of rounding), and the LoRAs do change the images."""
    from lorakit.sampling import generate

    seeds = [0, 1]
    base = _pixels(runner.setup("base")[0](seeds))
    for row, ads in (("frog_only", runner.ads[:1]), ("ink_only", runner.ads[1:]), ("merge", runner.ads)):
        fused = _pixels(runner.setup(row)[0](seeds))
        unfused = _pixels(generate(runner.pipe, ads, runner.sampler("merge"), runner.prompt, "", seeds)[0])
        assert abs(fused - unfused).max() <= 2, row
        assert abs(fused - base).max() > 20, row  # the LoRAs matter: a wrong scale or adapter would show


def test_rows_that_write_weights_leave_the_base_for_the_next_row(runner):
    """base, the fused rows and the fusions share one pipeline: each starts from the base weights again, so the base
    row is bit-identical before and after rows that wrote deltas into it."""
    before = _pixels(runner.setup("base")[0]([3]))
    for row in ("merge", "weighted", "frog_only"):
        runner.setup(row)[0]([3])
    assert (_pixels(runner.setup("base")[0]([3])) == before).all()
