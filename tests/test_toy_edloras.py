"""Toy ED-LoRA concepts cached by recipe hash (lorakit/toyworld/edloras.py), trained whole or in chunks."""

import pytest
import torch
from safetensors.torch import load_file

from lorakit.toyworld.edloras import concept_edlora_path, edlora_overrides, train_concept_edlora, trained_steps


def test_paths_are_named_by_concept_and_recipe(tmp_path):
    frog = concept_edlora_path("frog", tmp_path)
    assert frog.name.startswith("toy_edlora_frog-") and frog.suffix == ".safetensors"
    assert concept_edlora_path("kwibbit", tmp_path) == frog  # trigger word or name
    assert concept_edlora_path("robot", tmp_path) != frog
    assert concept_edlora_path("frog", tmp_path, overrides=["max_steps=7"]) != frog
    words = edlora_overrides("tophat")
    assert "concept.tokens=<tophat1> <tophat2>" in words and "concept.placeholder=hattock" in words
    with pytest.raises(ValueError, match="character or object"):
        edlora_overrides("ink")  # a style: not an ED-LoRA concept here


@pytest.mark.slow
def test_chunked_training_equals_one_run(tmp_path):
    small = ["max_steps=2", "train_batch_size=2"]
    whole = train_concept_edlora("frog", tmp_path / "whole", overrides=small)
    assert whole == concept_edlora_path("frog", tmp_path / "whole", overrides=small) and whole.exists()
    assert train_concept_edlora("frog", tmp_path / "chunks", overrides=small, max_new_steps=1) is None
    assert trained_steps("frog", tmp_path / "chunks", overrides=small) == 1
    chunked = train_concept_edlora("frog", tmp_path / "chunks", overrides=small, chunk_steps=1)
    assert chunked.name == whole.name
    a, b = load_file(whole), load_file(chunked)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert train_concept_edlora("frog", tmp_path / "chunks", overrides=small, chunk_steps=1) == chunked  # cached
