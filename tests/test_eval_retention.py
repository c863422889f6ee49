"""Retention mechanics on tiny pipelines: fused == a concept's own adapter keeps 1.0 of it; fused == base keeps 0."""

import copy
import json

import pytest
import torch

from lorakit.adapters.io import adapter_metadata, live_path, save_adapter
from lorakit.cli import main
from lorakit.eval.retention import ConceptSpec, retention
from lorakit.testing import random_adapter


def _merged_copy(pipe, adapter):
    """The base with ``W0 + delta`` written into its weights (a reference 'fused' model, no peft)."""
    out = copy.deepcopy(pipe)
    with torch.no_grad():
        for key, mod in adapter.modules.items():
            comp, path = key.split(".", 1)
            model = getattr(out, comp)
            layer = model.get_submodule(live_path(model, path))
            layer.weight += mod.delta().reshape(layer.weight.shape)
    return out


@pytest.fixture(scope="module")
def sd1_adapters(sd1_pipe):
    a = random_adapter(sd1_pipe, blocks={"IN1": 4, "OUT2": 4}, text_encoder=True, seed=1, std=0.2)
    b = random_adapter(sd1_pipe, blocks={"MID": 4, "OUT1": 4}, seed=2, std=0.2)
    return a, b


def test_fused_equal_to_one_adapter_keeps_it_all(sd1_pipe, sd1_adapters):
    a, b = sd1_adapters
    concepts = [ConceptSpec("a", a, ["red cat", "a picture of red cat"]), ConceptSpec("b", b, ["blue dog"])]
    res = retention(copy.deepcopy(sd1_pipe), concepts, a, samples=2)
    ra, rb = res["concepts"]
    assert ra["projection"] == pytest.approx(1.0, abs=1e-6) and ra["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert ra["rel_error"] == pytest.approx(0.0, abs=1e-6) and ra["own_change"] > 1e-3
    assert abs(rb["projection"] - 1.0) > 0.2 and rb["rel_error"] > 0.2  # a different adapter is not b
    assert res["mean"]["projection"] == pytest.approx((ra["projection"] + rb["projection"]) / 2)


def test_fused_equal_to_base_keeps_nothing(sd1_pipe, sd1_adapters):
    a, _ = sd1_adapters
    res = retention(copy.deepcopy(sd1_pipe), [ConceptSpec("a", a, ["red cat"])], sd1_pipe, samples=2)
    r = res["concepts"][0]
    assert r["projection"] == 0.0 and r["cosine"] == 0.0 and r["rel_error"] == pytest.approx(1.0)
    # merge:1 of a single adapter is that adapter
    res = retention(copy.deepcopy(sd1_pipe), [ConceptSpec("a", a, ["red cat"])], "merge:1.0", samples=1)
    assert res["concepts"][0]["projection"] == pytest.approx(1.0, abs=1e-6)


def test_cli_with_fused_folder(sd1_pipe, sd1_adapters, tmp_path):
    from lorakit.models import save_pipeline

    a, b = sd1_adapters
    a.metadata.update(adapter_metadata("sd1", "lora", trigger="red cat"))
    save_adapter(a, tmp_path / "a.safetensors")
    save_adapter(b, tmp_path / "b.safetensors")
    save_pipeline(_merged_copy(sd1_pipe, a), tmp_path / "fused")
    out = tmp_path / "ret"
    assert main(["eval", "--metric", "retention", "--base", "tiny:sd1:0", "--adapters", str(tmp_path / "a.safetensors"),
                 str(tmp_path / "b.safetensors"), "--prompts", "red cat|a picture of red cat", "blue dog",
                 "--fused", str(tmp_path / "fused"), "--samples", "2", "--out", str(out), "--device", "cpu"]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    ra = res["concepts"][0]
    assert ra["name"] == "a" and ra["prompts"] == ["red cat", "a picture of red cat"]
    assert ra["projection"] == pytest.approx(1.0, abs=1e-3) and ra["cosine"] == pytest.approx(1.0, abs=1e-4)
    assert "| mean |" in out.with_suffix(".md").read_text()
    # default prompts come from the trigger; b has none -> a clear error naming the file
    assert main(["eval", "--metric", "retention", "--base", "tiny:sd1:0", "--adapters", str(tmp_path / "b.safetensors"),
                 "--fused", "merge", "--out", str(out)]) == 2


def test_sdxl_fused_adapter_file(sdxl_pipe, tmp_path):
    a = random_adapter(sdxl_pipe, blocks={"OUT0": 4}, text_encoder=True, seed=3, std=0.2)
    save_adapter(a, tmp_path / "a.safetensors")
    res = retention(copy.deepcopy(sdxl_pipe), [ConceptSpec("a", a, ["red cat"])], str(tmp_path / "a.safetensors"), samples=2)
    assert res["concepts"][0]["projection"] == pytest.approx(1.0, abs=1e-6)
    assert res["concepts"][0]["own_change"] > 1e-3


def test_edlora_concept(sd1_pipe, tmp_path):
    from lorakit.adapters import edlora as ed
    from lorakit.adapters.io import load_adapter
    from lorakit.models import pipeline_arch

    base = random_adapter(sd1_pipe, blocks={"OUT2": 4}, text_encoder=True, seed=5, std=0.2)
    layers = ed.cross_attention_layers(sd1_pipe.unet)
    g = torch.Generator().manual_seed(7)
    emb = {"text_encoder": {w: torch.randn(len(layers), 32, generator=g) for w in ("<cat1>", "<cat2>")}}
    concept = ed.EDLoRAConcept(name="cat", words=["<cat1>", "<cat2>"], init_word="cat")
    save_adapter(ed.edlora_adapter(base.modules, emb, [concept], layers, pipeline_arch(sd1_pipe), rank=4, alpha=2.0),
                 tmp_path / "cat.safetensors")
    spec = ConceptSpec("cat", load_adapter(tmp_path / "cat.safetensors"), ["a <cat1> <cat2>"], str(tmp_path / "cat.safetensors"))
    # the same file as the fused model: loaded a second time, its words renamed; it keeps all of the concept
    res = retention(copy.deepcopy(sd1_pipe), [spec], str(tmp_path / "cat.safetensors"), samples=2)
    r = res["concepts"][0]
    assert r["projection"] == pytest.approx(1.0, abs=1e-5) and r["own_change"] > 1e-3
