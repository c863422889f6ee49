"""Sidecars, presence summaries, markdown tables and the oracle metric (with a stand-in oracle)."""

import json

import pytest
import torch
from PIL import Image

from lorakit.adapters.io import adapter_metadata, save_adapter
from lorakit.cli import main
from lorakit.eval.images import find_images, read_sidecar, sidecar_concepts
from lorakit.eval.report import markdown_table, presence_summary, write_report


def test_sidecars_and_concepts(tmp_path, sd1_pipe):
    from lorakit.testing import random_adapter

    ad = random_adapter(sd1_pipe, blocks={"OUT3": 2}, rank=2)
    ad.metadata.update(adapter_metadata("sd1", "lora", trigger="zorbo"))
    save_adapter(ad, tmp_path / "robot_lora.safetensors")
    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "a.json").write_text(json.dumps({"prompt": "p", "adapters": [
        {"name": "a0", "path": str(tmp_path / "robot_lora.safetensors"), "weight": 1.0},
        {"name": "a1", "path": str(tmp_path / "missing.safetensors")}, str(tmp_path / "robot_lora.safetensors")]}))
    (tmp_path / "b.txt").write_text("a cat \n")
    recs = find_images(tmp_path)
    assert [r.path.name for r in recs] == ["a.png", "b.png"]
    assert [c.name for c in recs[0].concepts] == ["zorbo", "a1", "zorbo"]  # trigger from the file's header
    assert recs[1].prompt == "a cat" and recs[1].concepts == []
    cs = sidecar_concepts({"concepts": ["x", {"name": "ink", "category": "style", "description": "ink drawing"}]})
    assert [(c.name, c.category, c.description) for c in cs] == [("x", "", "x"), ("ink", "style", "ink drawing")]
    (tmp_path / "c.png").write_bytes(b"")
    (tmp_path / "c.json").write_text("{oops")
    with pytest.raises(ValueError, match="c.json: sidecar is not valid JSON"):
        read_sidecar(tmp_path / "c.png")
    with pytest.raises(ValueError, match="no images"):
        find_images(_empty(tmp_path))
    with pytest.raises(FileNotFoundError):
        find_images(tmp_path / "nope")


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_presence_summary_and_tables(tmp_path):
    items = [("0", {"cat": True, "ink": True}), ("1", {"cat": True, "ink": False}), ("2", {"cat": None, "ink": True}),
             ("3", {"cat": False, "ink": None})]
    s = presence_summary(items, {"cat": "character", "ink": "style"})
    assert s["all_present_rate"] == pytest.approx(1 / 3) and s["failed_images"] == 1 and s["all_present_images"] == 1
    assert s["per_concept"]["cat"] == {"rate": pytest.approx(2 / 3), "n": 3}
    assert s["per_category"]["style"] == {"rate": pytest.approx(2 / 3), "n": 3}
    md = markdown_table(["a", "b"], [["x|y", 0.12345], [None, float("nan")]])
    assert md.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 0.123 |", "| - | - |"]
    with pytest.raises(ValueError, match="2 headers"):
        markdown_table(["a", "b"], [[1]])
    js, md_path = write_report({"k": 1}, tmp_path / "out.json", "T", ["a"], [[1]])
    assert json.loads(js.read_text()) == {"k": 1} and md_path.read_text().startswith("## T")


def test_oracle_metric_with_a_stand_in_oracle(tmp_path, monkeypatch):
    import lorakit.toyworld.oracle as oracle
    from lorakit.toyworld.concepts import get_concept

    calls = []

    def fake_score(images, concepts=None, threshold=0.5):
        """Present when the image's red channel mean is above 128 (robot) / green above 128 (ink)."""
        names = list(dict.fromkeys(get_concept(c).name for c in concepts))
        calls.append(names)
        probs = torch.tensor([[float(im.getpixel((0, 0))[0] > 128 if n == "robot" else im.getpixel((0, 0))[1] > 128)
                               for n in names] for im in images])
        return oracle.OracleScores(names, probs, probs >= threshold, threshold)

    monkeypatch.setattr(oracle, "score", fake_score)
    colors = [(255, 255, 0), (255, 0, 0), (0, 255, 0), (255, 255, 0)]
    for i, c in enumerate(colors):
        Image.new("RGB", (8, 8), c).save(tmp_path / f"{i}.png")
        concepts = ["zorbo", "inkvel"] if i < 3 else ["robot"]  # triggers or names
        (tmp_path / f"{i}.json").write_text(json.dumps({"prompt": "p", "concepts": concepts}))
    assert main(["eval", "--metric", "oracle", "--images", str(tmp_path), "--batch-size", "3"]) == 0
    res = json.loads((tmp_path / "eval_oracle.json").read_text())
    s = res["summary"]
    assert s["all_present_rate"] == 0.5  # image 0 and image 3 have everything they ask for
    assert s["per_concept"]["robot"] == {"rate": 0.75, "n": 4} and s["per_concept"]["ink"] == {"rate": 2 / 3, "n": 3}
    assert s["per_category"] == {"character": {"rate": 0.75, "n": 4}, "style": {"rate": 2 / 3, "n": 3}}
    assert res["per_image"][1]["present"] == {"robot": True, "ink": False}
    assert calls == [["robot", "ink"], ["robot"]]
    (tmp_path / "4.png").write_bytes((tmp_path / "0.png").read_bytes())
    (tmp_path / "4.json").write_text(json.dumps({"prompt": "p", "concepts": ["unicorn"]}))
    assert main(["eval", "--metric", "oracle", "--images", str(tmp_path)]) == 2  # unknown concept, named
