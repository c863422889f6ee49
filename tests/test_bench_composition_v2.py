"""tools/bench_composition.py --world v2: sets by kind, like-for-like runs, per-half scoring, resume per cell."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bench_composition as bench
from lorakit.toyworld.v2 import composition as v2c
from lorakit.toyworld.v2.concepts import CONCEPTS


def test_sets_take_one_identity_per_kind_and_a_character_first():
    sets = v2c.composition_sets((2, 3, 4))
    counts = {n: sum(s["n"] == n for s in sets) for n in (2, 3, 4)}
    assert counts == {2: 18, 3: 36, 4: 24}  # 3 characters x (2+2+2 | 4+4+4 | 2*2*2)
    for s in sets:
        kinds = [CONCEPTS[c].kind for c in s["concepts"].values()]
        assert list(s["concepts"]) == kinds and kinds[0] == "character" and len(set(kinds)) == s["n"]
        assert all(CONCEPTS[c].role == "identity" for c in s["concepts"].values())
        assert all(f"{c} {CONCEPTS[c].cls}" in s["prompt"] for c in s["concepts"].values())
    s = next(s for s in sets if s["id"] == "n4-kwibbit-hattock-inkvel-nocturo")
    assert s["prompt"] == "kwibbit frog, hattock hat, nocturo night background, inkvel outline style"
    assert next(s for s in sets if s["id"] == "n2-zorbo-shroomel")["prompt"] == \
        "zorbo robot, shroomel mushroom, white plain background"
    only = v2c.composition_sets((2, 3), available=["kwibbit", "zorbo", "nocturo", "inkvel"])
    assert sorted(s["id"] for s in only) == ["n2-kwibbit-inkvel", "n2-kwibbit-nocturo", "n2-zorbo-inkvel",
                                             "n2-zorbo-nocturo", "n3-kwibbit-inkvel-nocturo", "n3-zorbo-inkvel-nocturo"]
    sample = v2c.composition_sets((2, 4), per_size=3, seed=5)
    assert [s["n"] for s in sample] == [2, 2, 2, 4, 4, 4] and sample == v2c.composition_sets((2, 4), 3, 5)
    with pytest.raises(ValueError, match="set size 1"):
        v2c.composition_sets((1,))


def test_regional_sets_put_each_character_in_its_half():
    sets = v2c.regional_sets()
    assert len(sets) == 12 and len({s["id"] for s in sets}) == 12  # ordered pairs of 3 characters, with / without
    assert all(v2c.per_half(s) for s in sets) and not any(v2c.per_half(s) for s in v2c.composition_sets((2,)))
    g = next(s for s in sets if s["id"] == "g2-kwibbit-zorbo")
    assert "regions" not in g and g["n"] == v2c.GLOBAL_GROUP and v2c.region_spec(g) is None
    s = next(s for s in sets if s["id"] == "r2-kwibbit-zorbo")
    assert s["concepts"] == {"left": "kwibbit", "right": "zorbo"} and s["n"] == v2c.REGIONAL_GROUP
    assert s["prompt"] == g["prompt"] == "kwibbit frog, zorbo robot, white plain background"
    assert [r["prompt"] for r in s["regions"]] == ["kwibbit frog, white plain background",
                                                   "zorbo robot, white plain background"]
    spec = v2c.region_spec(s)
    assert [r.box for r in spec.regions] == [(0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)] and spec.prompt == s["prompt"]
    assert v2c.slot_kinds(s) == ["character", "character"] and v2c.region_spec(v2c.composition_sets((2,))[0]) is None


@pytest.mark.slow  # imports the training stack (lorakit.toyworld.v2.loras)
def test_training_captions_are_the_recipe_datasets_captions(tmp_path):
    from lorakit.toyworld.v2.dataset import make_dataset
    from lorakit.toyworld.v2.loras import DATA_N, DATA_SEED

    make_dataset("hattock", tmp_path, 6, DATA_SEED)  # the first 6 scenes of the recipe's DATA_N
    written = list(dict.fromkeys(p.read_text().strip() for p in sorted(tmp_path.glob("*.txt"))))
    assert v2c.training_captions("hattock", len(written)) == written and all("hattock hat" in c for c in written)
    assert len(v2c.training_captions("hattock", 100)) <= DATA_N


class ColourOracle:
    """Says an identity is there when its colour is in the image (kwibbit red, zorbo blue)."""

    colours = {"kwibbit": (255, 0, 0), "zorbo": (0, 0, 255)}

    def score(self, images, names):
        probs = torch.tensor([[float((np.asarray(im) == self.colours[n]).all(-1).any()) for n in names] for im in images])
        return type("S", (), {"probs": probs, "present": probs >= 0.5})()


def _two_squares(left, right):
    a = np.full((64, 64, 3), 255, np.uint8)
    a[24:40, 8:24], a[24:40, 40:56] = left, right
    return Image.fromarray(a)


def test_each_half_is_scored_for_its_own_character():
    red, blue = ColourOracle.colours["kwibbit"], ColourOracle.colours["zorbo"]
    images = [_two_squares(red, blue), _two_squares(blue, red), _two_squares(red, red)]
    views = v2c.half_views(images[0])
    assert [v.size for v in views] == [(64, 64)] * 2
    assert np.asarray(views[0])[32, 32].tolist() == list(red) and np.asarray(views[1])[32, 32].tolist() == list(blue)
    assert np.asarray(views[0])[32, 60].tolist() == [255, 255, 255]  # the other half is background
    concepts = {"left": "kwibbit", "right": "zorbo"}
    got = v2c.presence(ColourOracle(), images, concepts, regional=True)
    assert got["present"] == [[True, True], [False, False], [True, False]]
    assert got["swapped"] == [False, True, False] and got["all_present"] == pytest.approx(1 / 3)
    whole = v2c.presence(ColourOracle(), images, concepts)  # the whole image cannot tell places apart
    assert whole["present"] == [[True, True], [True, True], [True, False]]


# ---------------------------------------------------------------------------------------- tool, tiny world


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """An untrained v2 pipeline, an untrained v2 oracle and random LoRAs at the recipe paths of three
    identities (plumbing only: the verdicts mean nothing)."""
    from safetensors.torch import save_file

    from lorakit.adapters.io import save_adapter
    from lorakit.testing import random_adapter
    from lorakit.toyworld.v2.loras import lora_path
    from lorakit.toyworld.v2.models import build_toy_pipeline
    from lorakit.toyworld.v2.oracle import OracleNet

    root = tmp_path_factory.mktemp("v2bench")
    pipe = build_toy_pipeline(0)
    pipe.save_pretrained(root / "pipe")
    (root / "oracle").mkdir()
    torch.manual_seed(0)
    save_file(OracleNet(len(CONCEPTS)).state_dict(), root / "oracle" / "oracle.safetensors")
    (root / "oracle" / "config.json").write_text(json.dumps({"world": "v2", "concepts": list(CONCEPTS)}))
    for i, name in enumerate(("kwibbit", "zorbo", "nocturo")):
        save_adapter(random_adapter(pipe, blocks={"OUT3": 2}, rank=2, seed=i, std=0.5),
                     lora_path(name, root / "loras", root / "pipe"))
    return root


def _argv(world, out, *extra):
    return ["--world", "v2", "--base", str(world / "pipe"), "--oracle", str(world / "oracle"), "--adapters-dir",
            str(world / "loras"), "--out", str(out), "--steps", "2", "--k", "2", "--seed", "7", *extra]


@pytest.mark.slow
def test_v2_inputs_are_checked_and_named(tiny_world, tmp_path, capsys):
    args = bench.parse_args(_argv(tiny_world, tmp_path, "--sizes", "2"))
    assert args.scale == 0.8 and args.oracle == str(tiny_world / "oracle")
    sets = [s for s in v2c.composition_sets((2,)) if s["id"] in ("n2-kwibbit-nocturo", "n2-bloopo-hattock")]
    text = "\n".join(bench.missing_inputs(args, sets))
    assert "bloopo, hattock" in text and "kwibbit" not in text
    bad = bench.parse_args(_argv(tiny_world, tmp_path, "--oracle", str(tmp_path)))
    assert "v2 oracle" in "\n".join(bench.missing_inputs(bad, sets))
    assert bench.main(_argv(tiny_world, tmp_path, "--sizes", "2", "--sets", "n2-bloopo-hattock")) == 2
    assert "bloopo, hattock" in capsys.readouterr().err
    assert v2c.find_adapters(tiny_world / "loras", tiny_world / "pipe", ["kwibbit", "bloopo"]).keys() == {"kwibbit"}
    with pytest.raises(SystemExit):
        bench.parse_args(["--regional"])  # v1 has no regional sets


@pytest.mark.slow
def test_every_method_gets_the_same_prompt_seeds_and_scale_and_regions(tiny_world, tmp_path, monkeypatch):
    import lorakit.sampling as sampling
    from lorakit.toyworld.v2.loras import lora_path

    calls, real = [], sampling.generate

    def spy(pipe, adapters, settings, prompt, negative, seeds, **kw):
        calls.append({"method": settings.method, "prompt": prompt, "seeds": list(seeds), "regions": kw.get("regions"),
                      "weights": [a.weight for a in adapters], "order": kw.get("order")})
        return real(pipe, adapters, settings, prompt, negative, seeds, **kw)

    monkeypatch.setattr(sampling, "generate", spy)
    out = tmp_path / "out"
    methods = ["merge", "switch", "composite", "cmlora"]
    assert bench.main(_argv(tiny_world, out, "--sizes", "2", "--regional", "--methods", *methods, "--sets",
                            "n2-kwibbit-nocturo", "r2-kwibbit-zorbo", "g2-kwibbit-zorbo")) == 0
    assert [c["method"] for c in calls] == methods * 3  # set by set, every method on each
    for set_calls in (calls[:4], calls[4:8], calls[8:]):
        assert len({(c["prompt"], tuple(c["seeds"]), tuple(c["weights"])) for c in set_calls}) == 1
        assert set_calls[0]["seeds"] == [7, 8] and set(set_calls[0]["weights"]) == {0.8}
    assert all(c["regions"] is None for c in calls[:4] + calls[8:])
    assert all([r.prompt for r in c["regions"].regions] == ["kwibbit frog, white plain background",
                                                            "zorbo robot, white plain background"] for c in calls[4:8])
    assert calls[3]["order"] == [0, 1]  # CMLoRA's category order: the character, then the background
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert summary["cells"]["merge/n2"]["all_present"]["n"] == 2 and "left" in summary["cells"]["merge/n2r"]["per_category"]
    assert {p["a"] for p in summary["paired"] if p["n_adapters"] == "2r"} == {"merge", "switch", "composite"}
    assert set(summary["ceiling"]) == {"n2-kwibbit-nocturo", "r2-kwibbit-zorbo", "g2-kwibbit-zorbo"}
    assert set(summary["regions_vs_global"]) == set(methods) and summary["regions_vs_global"]["merge"]["pairs"] == 2
    assert "Two characters: N = 2r with left / right regions" in (out / "table.md").read_text()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert rows[0]["adapters"] == {n: lora_path(n, tiny_world / "loras", tiny_world / "pipe").name
                                   for n in ("kwibbit", "nocturo")}  # which LoRA files made each cell


def test_lorakit_variants_are_bench_methods_with_their_sample_settings():
    from lorakit.sampling import SamplerSettings

    args = bench.parse_args(["--world", "v2"])
    assert {"composite-ubase", "delta"} <= set(args.methods) and "lorarar" not in args.methods
    assert bench.parse_args(["--methods", "composite-ubase", "delta"]).methods == ["composite-ubase", "delta"]
    ubase = SamplerSettings(**bench.SAMPLER_SETTINGS["composite-ubase"])
    ubase.check()
    assert (ubase.method, ubase.uncond) == ("composite", "base")
    parts = SamplerSettings(**bench.SAMPLER_SETTINGS["delta-parts"])
    parts.check()
    assert (parts.method, parts.prompt_parts, parts.uncond) == ("delta", "per-adapter", "adapter")
    assert "delta-parts" in args.methods
    for name in ("composite-ubase", "delta", "delta-parts"):  # --help's epilog names them
        assert name in bench.__doc__
    for name in bench.VARIANT_METHODS:  # run only when named, each a valid sampling setting
        variant = SamplerSettings(**bench.SAMPLER_SETTINGS[name])
        variant.check()
        assert name not in args.methods
    assert "delta-masked-classes-t0.3" in bench.__doc__
    hard = SamplerSettings(**bench.SAMPLER_SETTINGS["delta-masked-classes-t0.5"])
    assert (hard.masks, hard.mask_threshold, hard.prompt_parts) == ("attention", 0.5, "class-words")


@pytest.mark.slow
def test_lorakit_variants_run_like_for_like_and_differ_from_composite(tiny_world, tmp_path, monkeypatch):
    import lorakit.sampling as sampling

    calls, real = [], sampling.generate

    def spy(pipe, adapters, settings, prompt, negative, seeds, **kw):
        calls.append((settings.method, settings.uncond, prompt, tuple(seeds), tuple(a.weight for a in adapters)))
        return real(pipe, adapters, settings, prompt, negative, seeds, **kw)

    monkeypatch.setattr(sampling, "generate", spy)
    out = tmp_path / "out"
    methods = ["composite", "composite-ubase", "delta"]
    assert bench.main(_argv(tiny_world, out, "--sizes", "2", "--methods", *methods, "--sets", "n2-kwibbit-nocturo",
                            "--scale", "1.5")) == 0
    assert [c[:2] for c in calls] == [("composite", "adapter"), ("composite", "base"), ("delta", "adapter")]
    assert len({c[2:] for c in calls}) == 1 and calls[0][4] == (1.5, 1.5)  # same prompt, seeds and scale
    folder = out / "images"
    pixels = {m: np.asarray(Image.open(folder / m / "n2" / "n2-kwibbit-nocturo-s7.png"), dtype=float) for m in methods}
    assert np.abs(pixels["composite-ubase"] - pixels["composite"]).max() > 0  # the base's unconditional pass
    assert np.abs(pixels["delta"] - pixels["composite"]).max() > 0
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert {"composite-ubase/n2", "delta/n2"} <= set(summary["cells"])
    assert {(p["a"], p["b"]) for p in summary["paired"]} == {("composite", "composite-ubase"), ("composite", "delta"),
                                                             ("composite-ubase", "delta")}


@pytest.mark.slow
def test_a_run_stopped_by_its_budget_resumes_cell_by_cell(tiny_world, tmp_path, monkeypatch):
    import lorakit.sampling as sampling

    argv = ["--sizes", "2", "--methods", "merge", "composite", "--sets", "n2-kwibbit-nocturo", "n2-zorbo-nocturo"]
    assert bench.main(_argv(tiny_world, tmp_path / "whole", *argv)) == 0
    whole = [json.loads(line) for line in (tmp_path / "whole" / "results.jsonl").read_text().splitlines()]

    calls, real = [], sampling.generate
    monkeypatch.setattr(sampling, "generate", lambda *a, **kw: calls.append(a[2].method) or real(*a, **kw))
    chunked, codes = tmp_path / "chunked", []
    while not codes or codes[-1] == 3:
        codes.append(bench.main(_argv(tiny_world, chunked, *argv, "--resume", "--budget-s", "0.001")))
        assert len(codes) < 10
    assert codes == [3, 3, 3, 0] and len(calls) == 4  # one cell per run; no cell generated twice
    parts = [json.loads(line) for line in (chunked / "results.jsonl").read_text().splitlines()]
    keep = ("method", "set", "seeds", "scale", "present", "probs")
    assert [{k: r[k] for k in keep} for r in parts] == [{k: r[k] for k in keep} for r in whole]
    rates = [{k: c["all_present"] for k, c in json.loads((d / "summary.json").read_text())["summary"]["cells"].items()}
             for d in (chunked, tmp_path / "whole")]
    assert rates[0] == rates[1] and rates[0]["composite/n2"]["n"] == 4


# ------------------------------------------------------------------------ measure_composition_methods --world v2


def test_methods_summary_counts_each_kind_over_the_sets_that_have_it():
    import measure_composition_methods as mcm

    def rec(method, set_id, seed, kinds, present):
        return {"method": method, "set": set_id, "n": 2, "seed": seed, "kinds": kinds, "present": present,
                "all": all(present), "s_per_image": 1.0}

    records = [rec(m, "n2-kwibbit-nocturo", s, ["character", "background"], [True, m == "delta"]) for m in
               ("merge", "delta") for s in range(4)]
    records += [rec(m, "n2-kwibbit-pixlor", s, ["character", "style"], [s < 2, True]) for m in ("merge", "delta")
                for s in range(4)]
    rows = mcm.summarise(records, ["merge", "delta"])
    delta = next(r for r in rows if r["method"] == "delta" and "vs" not in r)
    assert delta["per_kind"] == {"character": 0.75, "background": 1.0, "style": 1.0} and delta["n"] == 8
    assert (delta["character_and_style"], delta["character_and_style_n"]) == (0.5, 4)  # the style sets only
    pair = next(r for r in rows if r.get("vs") == "merge")
    assert (pair["all_wins"], pair["all_losses"], pair["cs_wins"]) == (4, 0, 0)
    table = mcm.markdown(rows)
    assert "| delta | 8 | 6/8 = 0.75" in table and "2/4 [" in table


@pytest.mark.slow
def test_methods_tool_runs_v2_sets_and_resumes(tiny_world, tmp_path, monkeypatch, capsys):
    import sys

    import measure_composition_methods as mcm

    out = tmp_path / "mcm"
    argv = ["mcm", "--world", "v2", "--base", str(tiny_world / "pipe"), "--oracle", str(tiny_world / "oracle"),
            "--adapters-dir", str(tiny_world / "loras"), "--sizes", "2", "--sets", "n2-kwibbit-nocturo", "--k", "2",
            "--steps", "2", "--methods", "merge", "delta", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    mcm.main()
    records = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert [(r["method"], r["seed"], r["kinds"]) for r in records] == [
        (m, s, ["character", "background"]) for m in ("merge", "delta") for s in (0, 1)]
    mcm.main()  # everything is there: nothing generated again
    assert len((out / "images.jsonl").read_text().splitlines()) == 4
    monkeypatch.setattr(sys, "argv", [a if a != "n2-kwibbit-nocturo" else "n2-bloopo-hattock" for a in argv])
    with pytest.raises(SystemExit):
        mcm.main()
    assert "bloopo, hattock" in capsys.readouterr().err


def test_method_scales_parse_to_one_scale_per_method_and_bad_items_exit_2(capsys):
    args = bench.parse_args(["--world", "v2", "--methods", "merge", "delta", "--method-scales", "merge=0.6", "delta=1"])
    assert args.method_scales == {"merge": 0.6, "delta": 1.0}
    assert bench.parse_args(["--world", "v2"]).method_scales == {}
    for argv, message in ((["--method-scales", "merge:0.6"], "expected METHOD=SCALE"),
                          (["--methods", "merge", "--method-scales", "delta=1"], "not one of the run's methods"),
                          (["--method-scales", "merge=0.6", "--sweep", "0.6", "1"], "pass one of them")):
        with pytest.raises(SystemExit) as stop:
            bench.parse_args(["--world", "v2", *argv])
        assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_method_scales_set_each_methods_lora_weight_in_the_report(tiny_world, tmp_path, monkeypatch):
    import lorakit.sampling as sampling

    weights, real = {}, sampling.generate

    def spy(pipe, adapters, settings, prompt, negative, seeds, **kw):
        weights[settings.method] = tuple(a.weight for a in adapters)
        return real(pipe, adapters, settings, prompt, negative, seeds, **kw)

    monkeypatch.setattr(sampling, "generate", spy)
    out = tmp_path / "out"
    assert bench.main(_argv(tiny_world, out, "--sizes", "2", "--methods", "merge", "composite", "--sets",
                            "n2-kwibbit-nocturo", "--method-scales", "composite=1.5")) == 0
    assert weights == {"merge": (0.8, 0.8), "composite": (1.5, 1.5)}
    cells = json.loads((out / "summary.json").read_text())["summary"]["cells"]
    assert cells["composite/n2"]["scale"] == 1.5 and cells["merge/n2"]["scale"] == 0.8
    assert "--method-scales" in (out / "table.md").read_text()


def test_lora_set_picks_the_lora_trained_with_that_override(tmp_path, capsys):
    """``--lora-set nocturo:max_steps=600`` looks for the file ``train_toy2_loras.py --set max_steps=600`` makes
    (another recipe hash) for that identity only; bad items exit 2 naming the item."""
    from lorakit.toyworld.v2.loras import lora_path
    from lorakit.toyworld.v2.models import DEFAULT_BASE

    args = bench.parse_args(["--world", "v2", "--lora-set", "nocturo:max_steps=600", "nocturo:network.rank=4",
                             "--adapters-dir", str(tmp_path)])
    assert args.lora_set == {"nocturo": ["max_steps=600", "network.rank=4"]}
    plain = lora_path("nocturo", tmp_path, DEFAULT_BASE)
    longer = lora_path("nocturo", tmp_path, DEFAULT_BASE, ["max_steps=600", "network.rank=4"])
    assert longer != plain
    for path in (plain, longer, lora_path("kwibbit", tmp_path, DEFAULT_BASE)):
        path.write_bytes(b"x")
    found = v2c.find_adapters(tmp_path, DEFAULT_BASE, ["nocturo", "kwibbit"], args.lora_set)
    assert found == {"nocturo": longer, "kwibbit": lora_path("kwibbit", tmp_path, DEFAULT_BASE)}
    longer.unlink()
    sets = [s for s in v2c.composition_sets((2,)) if s["id"] == "n2-kwibbit-nocturo"]
    text = "\n".join(bench.missing_inputs(args, sets))
    assert "for nocturo" in text and "--set max_steps=600 network.rank=4" in text and "kwibbit" not in text.split("(")[0]
    for argv, message in ((["--world", "v2", "--lora-set", "nocturo"], "expected IDENTITY:KEY=VALUE"),
                          (["--world", "v2", "--lora-set", "frog:max_steps=2"], "expected IDENTITY:KEY=VALUE"),
                          (["--lora-set", "nocturo:max_steps=2"], "only with --world v2")):
        with pytest.raises(SystemExit) as stop:
            bench.parse_args(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_bad_lora_set_key_is_one_line_and_exit_2(tmp_path):
    """The override reaches the recipe only when the LoRA is looked up: its ConfigError is one line, not a
    traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "bench_composition.py"
    proc = subprocess.run([sys.executable, str(tool), "--world", "v2", "--lora-set", "nocturo:rank=4", "--sizes", "2",
                           "--sets", "n2-kwibbit-nocturo", "--adapters-dir", str(tmp_path), "--dry-run"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "rank=4" in proc.stderr and "unknown config key" in proc.stderr


def test_ziplora_and_lorarar_fuse_character_style_pairs_only_with_their_inputs(tmp_path, monkeypatch):
    """ziplora (run only when named) fuses a character + style pair against each identity's training images;
    lorarar needs a hypernetwork trained on v2 LoRAs; both skip every other kind of set."""
    import argparse

    args = bench.parse_args(["--world", "v2", "--methods", "ziplora", "lorarar", "--hypernet", str(tmp_path / "h")])
    assert "ziplora" not in bench.parse_args(["--world", "v2"]).methods
    sets = {s["id"]: s for s in v2c.composition_sets((2,))}
    assert any("lorarar" in line for line in v2c.missing_inputs(args, [sets["n2-zorbo-inkvel"]]))
    (tmp_path / "h").write_bytes(b"x")
    assert not any("lorarar" in line for line in v2c.missing_inputs(args, [sets["n2-zorbo-inkvel"]]))
    calls = []
    monkeypatch.setattr("lorakit.cli.main", lambda argv: calls.append(argv) or 0)
    monkeypatch.setattr(bench.FusionRunner, "sample_fused", lambda self, m, out, s, seeds: ([None] * len(seeds), 0.1))
    ns = argparse.Namespace(**{**vars(args), "adapters_dir": str(tmp_path / "loras"), "base": "BASE"})
    runner = bench.FusionRunner(ns, {"zorbo": tmp_path / "z.safetensors", "inkvel": tmp_path / "i.safetensors",
                                     "nocturo": tmp_path / "n.safetensors"}, tmp_path / "fused")
    images, _, _ = runner.run("ziplora", sets["n2-zorbo-inkvel"], [0, 1], 0.8)
    assert len(images) == 2 and calls[-1][:3] == ["fuse", "--method", "ziplora"]
    refs = calls[-1][calls[-1].index("--ref-images") + 1:][:2]
    assert [Path(r).name for r in refs] == ["zorbo-n40-s0", "inkvel-n40-s0"]
    for r, name in zip(refs, ("zorbo", "inkvel")):  # the recipes' own training renders
        assert len(list(Path(r).glob("*.png"))) == 40 and name in (Path(r) / "00000.txt").read_text()
    assert "--weights" not in calls[-1]  # the optimised coefficients set the merge, as lorarar's
    before = len(calls)
    for method in ("ziplora", "lorarar"):
        images, _, info = runner.run(method, sets["n2-zorbo-nocturo"], [0], 0.8)
        assert images is None and "content LoRA and a style LoRA" in info["skipped"]
    assert len(calls) == before
