"""tools/measure_fusion_toy.py: evaluation captions ask for both concepts, method specs parse."""

import pytest

from measure_fusion_toy import eval_prompts, parse_method


def test_eval_prompts_ask_for_both_concepts_and_differ_from_the_fit_captions():
    from lorakit.toyworld.concepts import get_concept
    from lorakit.toyworld.evaluate import concept_prompts

    prompts = eval_prompts("frog", "ink", 16)
    assert len(prompts) == 16 and len(set(prompts)) > 4
    assert all(get_concept("frog").trigger in p and get_concept("ink").trigger in p for p in prompts)
    fit = set(concept_prompts("frog", 4, seed=0) + concept_prompts("ink", 4, seed=0))
    assert not fit & set(prompts)  # held out: no evaluation caption was fitted
    assert eval_prompts("robot", "tophat", 4) == eval_prompts("robot", "tophat", 4)  # seeded


def test_method_specs():
    assert parse_method("gradient") == ("gradient", {})
    assert parse_method("gradient+ridge_target=average+ridge=0.1") == ("gradient", {"ridge_target": "average",
                                                                                     "ridge": 0.1})
    with pytest.raises(SystemExit):
        parse_method("magic")


def test_edlora_set_prompts_hold_every_concept_as_pseudo_words():
    from measure_edlora_fusion_toy import many_prompts, with_words

    names = ["robot", "frog", "tophat", "mushroom"]
    words = {n: f"<{n}1> <{n}2>" for n in names}
    prompts = with_words(many_prompts(names, 12), names, words)
    assert len(prompts) == 12 and len(set(prompts)) > 3
    assert all(all(w in p for w in words.values()) for p in prompts)
    assert not any(t in p for p in prompts for t in ("zorbo", "kwibbit", "hattock", "shroomel"))


def test_edlora_results_are_cached_per_set_method_files_and_n(tmp_path, monkeypatch):
    from measure_edlora_fusion_toy import edlora_files, result_path

    files = {"robot": "a/toy_edlora_robot-1.safetensors", "frog": "a/toy_edlora_frog-2.safetensors"}
    path = result_path(str(tmp_path), "robot+frog", "gradient", files, 96)
    assert path == result_path(str(tmp_path), "robot+frog", "gradient", dict(files), 96)
    assert path.parent == tmp_path and path.name.startswith("robot+frog-gradient-n96-")
    others = [result_path(str(tmp_path), "robot+frog", "weighted", files, 96),
              result_path(str(tmp_path), "robot+frog", "gradient", files, 32),
              result_path(str(tmp_path), "robot+frog", "gradient", {**files, "frog": "a/toy_edlora_frog-3.safetensors"},
                          96)]
    assert len({path, *others}) == 4  # a retrained file (new hash) is measured again
    monkeypatch.setenv("LORAKIT_TOY_LORAS", str(tmp_path))  # an empty cache: the error names the training command
    with pytest.raises(SystemExit, match="train_toy_edloras.py frog"):
        edlora_files(["robot=x.safetensors"], {"robot", "frog"})
    assert edlora_files(["robot=x.safetensors", "frog=y.safetensors"], {"robot", "frog"})["frog"] == "y.safetensors"
