"""One chunked-training path (lorakit/training/chunked.py) for block-wise LoRAs and ED-LoRAs: the cache's file
names stay those of earlier lorakit versions, a run folder of an earlier ED-LoRA run is continued in place, and a
run trained in parts equals one uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def test_cache_file_names_are_those_of_the_trained_caches(tmp_path):
    # The shared caches hold files under these names (v1 LoRA, v1 ED-LoRA, v2 LoRA on the bundled v1 base as a
    # stand-in folder); a change of the recipe hash would retrain every one of them.
    from lorakit.resources import data_path
    from lorakit.toyworld.edloras import concept_edlora_path
    from lorakit.toyworld.loras import concept_lora_path
    from lorakit.toyworld.v2.loras import lora_path

    assert concept_lora_path("robot", tmp_path).name == "toy_robot-1d085244d8b895d9.safetensors"
    assert concept_edlora_path("robot", tmp_path).name == "toy_edlora_robot-7e022307245e6050.safetensors"
    assert lora_path("kwibbit", tmp_path, data_path("toy-base")).name == "toy2_kwibbit-6d2cc1597c25b8bf.safetensors"


def test_run_folder_is_partial_unless_an_earlier_work_folder_exists(tmp_path):
    from lorakit.training.chunked import legacy_work_dir, partial_dir, trained_step, work_dir

    target = tmp_path / "toy_edlora_frog-0123.safetensors"
    assert partial_dir(target) == tmp_path / ".toy_edlora_frog-0123.partial"
    assert work_dir(target) == partial_dir(target) and trained_step(target) == 0
    (partial_dir(target) / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    assert trained_step(target) == 5
    (legacy_work_dir(target) / "checkpoints" / "checkpoint-7").mkdir(parents=True)
    assert legacy_work_dir(target) == tmp_path / "toy_edlora_frog-0123.work"
    assert work_dir(target) == legacy_work_dir(target) and trained_step(target) == 7


def test_v2_edlora_recipes_name_the_identity_and_its_class(tmp_path):
    from lorakit.toyworld.loras import recipe_config
    from lorakit.toyworld.v2.edloras import EDLORA_IDENTITIES, edlora_identity, recipe_path

    assert EDLORA_IDENTITIES == ("zorbo", "kwibbit", "bloopo", "hattock", "shroomel")
    cfg = recipe_config(recipe_path("kwibbit"), [], "edlora")
    assert (cfg.concept.tokens, cfg.concept.init_word, cfg.concept.placeholder) == ("<kwibbit1> <kwibbit2>", "frog",
                                                                                    "kwibbit")
    with pytest.raises(ValueError, match="character and object identities"):
        edlora_identity("inkvel")


def _random_pipe(root: Path) -> Path:
    from lorakit.toyworld.v2.models import build_toy_pipeline

    build_toy_pipeline(0).save_pretrained(root / "pipe")
    return root / "pipe"


def _same(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_v2_edlora_in_parts_equals_one_run_and_an_earlier_work_folder_is_continued_and_kept(tmp_path):
    from lorakit.toyworld.v2.edloras import edlora_path, recipe_path, train_identity_edlora_chunk
    from lorakit.training.chunked import legacy_work_dir, partial_dir, train_chunk, trained_step

    pipe, over = _random_pipe(tmp_path), ["max_steps=3", "train_batch_size=2"]
    whole = train_identity_edlora_chunk("zorbo", tmp_path / "whole", pipe, 100, over)
    assert whole == edlora_path("zorbo", tmp_path / "whole", pipe, over) and whole.exists()
    assert not partial_dir(whole).exists()  # lorakit's own run folder is removed once the file is kept

    parts = tmp_path / "parts"
    target = edlora_path("zorbo", parts, pipe, over)
    assert target.name == whole.name
    assert train_identity_edlora_chunk("zorbo", parts, pipe, 1, over) is None and trained_step(target) == 1
    assert train_identity_edlora_chunk("zorbo", parts, pipe, 3, over) == target
    assert _same(whole, target)

    # A run an earlier lorakit left in <stem>.work: continued there, and the folder stays.
    old = tmp_path / "old"
    target = edlora_path("zorbo", old, pipe, over)
    legacy_work_dir(target).mkdir(parents=True)
    recipe = recipe_path("zorbo")
    recipe_over = [f"base_model={pipe}", f"data.path={old / 'toy2-data' / 'zorbo-n40-s0'}", *over]
    assert train_chunk("edlora", recipe, recipe_over, target, 2) is None
    assert trained_step(target) == 2 and not partial_dir(target).exists()
    assert train_chunk("edlora", recipe, recipe_over, target, 3) == target
    assert legacy_work_dir(target).is_dir() and _same(whole, target)


def test_train_toy2_loras_starts_no_part_of_the_next_identity_that_cannot_end_in_time(tmp_path):
    # The last part (of the identity before) took 5 s and 3 s are left: the next identity starts nothing.
    import train_toy2_loras as tool

    from lorakit.resources import data_path

    last = [5.0]
    row = tool.train_within("kwibbit", str(tmp_path), str(data_path("toy-base")), [], 50, 3.0, clock=lambda: 0.0,
                            adapter="edlora", last_part=last)
    assert row == {"identity": "kwibbit", "done": False, "step": 0, "max_steps": 200, "adapter": None}
    assert last == [5.0] and not any(tmp_path.glob(".toy2_edlora_*"))
