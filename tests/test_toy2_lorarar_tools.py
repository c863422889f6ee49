"""tools/train_toy2_lorarar.py and tools/probe_pair_merge_prompts.py: their inputs, checked before any training."""

import pytest

import probe_pair_merge_prompts as probe
import train_toy2_lorarar as t2l


def test_identities_split_into_content_and_style():
    content, style = t2l.identities_by_role()
    assert set(content) == {"kwibbit", "zorbo", "bloopo", "hattock", "shroomel"}
    assert set(style) == {"inkvel", "pixlor"}


def test_a_holdout_of_the_wrong_kinds_is_one_line_and_exit_2(capsys):
    assert t2l.main(["--holdout", "inkvel", "zorbo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--holdout inkvel zorbo" in err and "pixlor" in err


def test_probe_adapters_parse_and_bad_items_exit_2(tmp_path, capsys):
    assert probe.parse_adapter("z=a/b.safetensors@0.8") == ("z", "a/b.safetensors", 0.8)
    assert probe.parse_adapter("m=merged.safetensors") == ("m", "merged.safetensors", 1.0)
    for bad in ("nofile", "z=f@high"):
        with pytest.raises(ValueError, match="--adapters"):
            probe.parse_adapter(bad)
    assert probe.main(["--pair", "zorbo", "inkvel", "--adapters", "z=f@high"]) == 2
    assert probe.main(["--pair", "zorbo", "inkvel", "--adapters", f"z={tmp_path / 'gone.safetensors'}"]) == 2
    err = capsys.readouterr().err
    assert "must be a number" in err and "no such adapter file" in err


def test_probe_prompts_are_the_recipes_and_the_benchmarks_captions():
    import bench_composition  # noqa: F401 - the benchmark's set uses the same caption
    from lorakit.toyworld.v2.composition import composition_sets

    prompts = probe.pair_prompts("zorbo", "inkvel")
    assert prompts["content-caption"] == "zorbo robot, white plain background"
    pair = next(s for s in composition_sets((2,)) if s["id"] == "n2-zorbo-inkvel")
    assert prompts["pair-caption"] == pair["prompt"]
