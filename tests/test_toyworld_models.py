"""The bundled toy base (data/toy-base) and the Must-show: a held-out concept's LoRA makes the oracle find it."""

import json
from pathlib import Path

import pytest
import torch

BASE = "data/toy-base"


@pytest.fixture(scope="module")
def toy_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(BASE)  # plain diffusers, no lorakit code
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_toy_base_loads_with_plain_diffusers(toy_pipe):
    from lorakit.models import pipeline_arch
    from lorakit.toyworld.concepts import HELDOUT, VOCAB

    assert type(toy_pipe).__name__ == "StableDiffusionPipeline"
    assert pipeline_arch(toy_pipe) == "sd1"
    assert toy_pipe.unet.dtype == torch.float32  # fp16 on disk, fp32 when loaded without torch_dtype
    for word in VOCAB:
        assert len(toy_pipe.tokenizer.tokenize(word)) == 1, word
    ids = toy_pipe.tokenizer(HELDOUT[0].trigger).input_ids
    assert len(ids) == 3  # bos, trigger, eos
    size = sum(f.stat().st_size for f in Path(BASE).rglob("*") if f.is_file())
    assert size < 30e6
    assert json.loads((Path(BASE) / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def test_toy_base_follows_generic_prompts(toy_pipe):
    from lorakit.toyworld.oracle import score
    from lorakit.toyworld.evaluate import generate

    prompts = ["red circle, white plain background", "blue square, sand plain background",
               "yellow triangle, gray gradient background", "green cross, pink stripes background"] * 2
    images = generate(toy_pipe, prompts, seed=0, steps=12)
    assert images[0].size == (32, 32)
    s = score(images)
    col = [s.concepts.index(c) for c in ("red", "blue", "yellow", "green") * 2]
    bg = [s.concepts.index(c) for c in ("plain", "plain", "gradient", "stripes") * 2]
    shp = [s.concepts.index(c) for c in ("circle", "square", "triangle", "cross") * 2]
    colour_hits = sum(bool(s.present[i, c]) for i, c in enumerate(col))
    bg_hits = sum(bool(s.present[i, c]) for i, c in enumerate(bg))
    shape_hits = sum(bool(s.present[i, c]) for i, c in enumerate(shp))
    assert colour_hits >= 6 and bg_hits >= 6 and shape_hits >= 6, (colour_hits, bg_hits, shape_hits)

