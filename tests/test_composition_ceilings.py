"""tools/composition_ceilings.py: one oracle-ceiling row per v2 composition set, filtered by rate, bad input exit 2."""

import json

import pytest

import composition_ceilings as tool


class FixedOracle:
    """Finds every identity but inkvel (as the real oracle often misses the character under inkvel's outlines)."""

    def score(self, images, names):
        import torch

        probs = torch.tensor([[0.0 if n == "inkvel" else 1.0 for n in names] for _ in images])
        return type("S", (), {"probs": probs, "present": probs >= 0.5})()


def test_rows_give_each_sets_rate_over_the_seeds():
    from lorakit.toyworld.v2.composition import composition_sets

    sets = [s for s in composition_sets((3,)) if s["id"] in ("n3-zorbo-hattock-nocturo", "n3-zorbo-inkvel-nocturo")]
    rows = tool.ceiling_rows(FixedOracle(), sets, [0, 1, 2], "fixed")
    assert [(r["set"], r["n"], r["all_present"]["k"], r["all_present"]["n"]) for r in rows] == [
        ("n3-zorbo-hattock-nocturo", 3, 3, 3), ("n3-zorbo-inkvel-nocturo", 3, 0, 3)]
    assert rows[0]["seeds"] == [0, 2] and rows[0]["oracle"] == "fixed"


class InkOracle:
    """Finds every identity in an image that is not all white."""

    def score(self, images, names):
        import numpy as np
        import torch

        probs = torch.tensor([[float((np.asarray(im) < 255).any())] * len(names) for im in images])
        return type("S", (), {"probs": probs, "present": probs >= 0.5})()


def test_a_transform_is_applied_to_the_renders_before_scoring():
    from PIL import Image

    from lorakit.toyworld.v2.composition import composition_sets

    sets = [s for s in composition_sets((3,)) if s["id"] == "n3-kwibbit-pixlor-nocturo"]
    seen = []

    def blank(images):
        seen.append(len(images))
        return [Image.new("RGB", im.size, (255, 255, 255)) for im in images]

    assert tool.ceiling_rows(InkOracle(), sets, [0, 1], "ink")[0]["all_present"]["k"] == 2
    row = tool.ceiling_rows(InkOracle(), sets, [0, 1], "ink", blank, "blank")[0]
    assert seen == [2] and row["all_present"]["k"] == 0 and row["source"] == "blank"


def test_main_writes_the_rows_at_or_above_min_rate(tmp_path, monkeypatch, capsys):
    from lorakit.toyworld.v2 import oracle

    monkeypatch.setattr(oracle.Oracle, "load", classmethod(lambda cls, path: FixedOracle()))
    oracle_dir = tmp_path / "oracle"
    oracle_dir.mkdir()
    (oracle_dir / "oracle.safetensors").write_bytes(b"")
    out = tmp_path / "ceil.jsonl"
    argv = ["--sizes", "3", "--sets", "n3-kwibbit-hattock-nocturo", "n3-kwibbit-inkvel-nocturo", "--k", "2",
            "--oracle", str(oracle_dir), "--out", str(out)]
    assert tool.main(argv + ["--min-rate", "0.8"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["set"] for r in rows] == ["n3-kwibbit-hattock-nocturo"] and rows[0]["all_present"]["rate"] == 1.0
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == rows[0]


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "5"], "--sizes 5"),
    (["--sizes", "3", "--sets", "n3-nobody"], "--sets n3-nobody"),
    (["--oracle", "/nonexistent/oracle"], "no oracle.safetensors"),
    (["--vae", "/nonexistent/pipeline"], "--vae /nonexistent/pipeline"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert tool.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_class_version_asks_for_the_classes_the_base_knows_in_colours_of_the_seed():
    from lorakit.toyworld.v2.composition import class_version, composition_sets
    from lorakit.toyworld.v2.render import caption

    (set_,) = [s for s in composition_sets((4,)) if s["id"] == "n4-kwibbit-hattock-inkvel-nocturo"]
    scene, classes = class_version(set_, 3)
    assert classes == {"character": "frog", "object": "hat", "style": "outline", "background": "night"}
    text = caption(scene)
    assert not any(name in text for name in set_["concepts"].values()), text
    assert all(word in text for word in ("frog", "hat", "night background", "outline style")), text
    assert scene.seed == 3 and class_version(set_, 3) == (scene, classes)  # a pure function of the seed
    assert len({caption(class_version(set_, seed)[0]) for seed in range(8)}) > 1  # colours change with it


class NamesOracle:
    """Finds the asked-for names in every image; records what it was asked."""

    def __init__(self):
        self.asked = []

    def score(self, images, names):
        import torch

        self.asked.append(list(names))
        probs = torch.ones(len(images), len(names))
        return type("S", (), {"probs": probs, "present": probs >= 0.5})()


def test_class_rows_score_the_classes_on_the_images_the_sampler_made():
    from PIL import Image

    from lorakit.toyworld.v2.composition import composition_sets
    from lorakit.toyworld.v2.render import caption

    sets = [s for s in composition_sets((3,)) if s["id"] == "n3-zorbo-hattock-chekka"]
    oracle, captions = NamesOracle(), []

    def sampler(scenes):
        captions.extend(caption(s) for s in scenes)
        return [Image.new("RGB", (64, 64)) for _ in scenes]

    (row,) = tool.class_rows(oracle, sets, [5, 6], "names", sampler, "base_samples:x")
    assert oracle.asked == [["robot", "hat", "checker"]]
    assert len(captions) == 2 and all("zorbo" not in c and "robot" in c for c in captions)
    assert row["measure"] == "v2_composition_class_ceiling" and row["source"] == "base_samples:x"
    assert row["all_present"]["k"] == 2 and set(row["per_category"]) == {"character", "object", "background"}
    assert row["example_prompt"] == captions[0]


@pytest.mark.parametrize("argv, message", [
    (["--base", "/nonexistent/pipeline"], "--base /nonexistent/pipeline"),
    (["--base", "BASE", "--vae", "BASE"], "--base and --vae"),
])
def test_bad_class_input_is_one_line_and_exit_2(argv, message, capsys):
    from lorakit.toyworld.v2.models import DEFAULT_BASE

    assert tool.main([str(DEFAULT_BASE) if a == "BASE" else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
