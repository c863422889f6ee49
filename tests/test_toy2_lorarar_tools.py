"""tools/train_toy2_lorarar.py and tools/probe_pair_merge_prompts.py: their inputs, checked before any training."""

import pytest

import probe_pair_merge_prompts as probe
import train_toy2_lorarar as t2l


def test_identities_split_into_content_and_style():
    content, style = t2l.identities_by_role()
    assert set(content) == {"kwibbit", "zorbo", "bloopo", "hattock", "shroomel"}
    assert set(style) == {"inkvel", "pixlor"}


def test_each_held_out_pair_gets_its_own_file(tmp_path, monkeypatch):
    """Two hypernetworks with different held-out pairs live side by side (neither clears the other)."""
    seen = []
    monkeypatch.setattr(t2l, "recipe_entries", lambda names, loras, base: {n: {"path": n, "images": n} for n in names})
    monkeypatch.setattr(t2l, "hypernet_config", lambda files, ov, holdout, base, entries: entries)
    monkeypatch.setattr(t2l, "train_hypernet_config", lambda cfg, out, prefix: seen.append((prefix, cfg)) or out / prefix)
    assert t2l.main(["--holdout", "zorbo", "inkvel", "--out", str(tmp_path)]) == 0
    assert t2l.main(["--holdout", "bloopo", "inkvel", "--out", str(tmp_path)]) == 0
    assert t2l.main(["--holdout", "zorbo", "inkvel", "--out", str(tmp_path), "--set", "learning_rate=0.01"]) == 0
    prefixes = [p for p, _ in seen]
    assert prefixes[:2] == ["toy2_lorarar-zorbo-inkvel", "toy2_lorarar-bloopo-inkvel"]
    assert prefixes[2].startswith("toy2_lorarar_set") and prefixes[2].endswith("-zorbo-inkvel")
    assert not any(p.startswith(q + "-") for p in prefixes for q in prefixes)  # no prefix globs another's files
    cfg = seen[0][1]
    assert "zorbo" not in [e["path"] for e in cfg["content"]] and cfg["eval_pairs"] == [[{"path": "zorbo", "images": "zorbo"},
                                                                                       {"path": "inkvel", "images": "inkvel"}]]
    assert [e["path"] for e in cfg["style"]] == ["inkvel", "pixlor"]


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


def test_merge_delta_ratios_read_each_parts_kept_fraction(tmp_path, capsys):
    """A merge whose content columns are halved and style columns kept reads 0.5 / 1.0 per layer; a merge without
    to_q / to_out layers is one line and exit 2."""
    import torch
    from safetensors.torch import save_file

    import merge_delta_ratios as mdr

    g = torch.Generator().manual_seed(0)
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    c = {f"{key}.lora_up.weight": torch.randn(6, 2, generator=g), f"{key}.lora_down.weight": torch.randn(2, 6, generator=g),
         f"{key}.alpha": torch.tensor(2.0)}
    s = {f"{key}.lora_up.weight": torch.randn(6, 2, generator=g), f"{key}.lora_down.weight": torch.randn(2, 6, generator=g),
         f"{key}.alpha": torch.tensor(2.0)}
    merged = {f"{key}.lora_up.weight": torch.cat([c[f"{key}.lora_up.weight"] * 0.5, s[f"{key}.lora_up.weight"]], 1),
              f"{key}.lora_down.weight": torch.cat([c[f"{key}.lora_down.weight"], s[f"{key}.lora_down.weight"]], 0),
              f"{key}.alpha": torch.tensor(4.0)}  # alpha / rank stays 1, as lorakit writes a merge
    from lorakit.adapters.io import load_adapter

    paths = []
    for name, t in (("c", c), ("s", s), ("m", merged)):
        paths.append(str(tmp_path / f"{name}.safetensors"))
        save_file(t, paths[-1])
    loaded = [load_adapter(p) for p in paths]
    r = mdr.ratios(*loaded)
    assert r["layers"] == list(loaded[2].modules) and len(r["layers"]) == 1 and r["layers"][0].endswith("attn1.to_q")
    assert abs(r["content"][0] - 0.5) < 1e-5 and abs(r["style"][0] - 1.0) < 1e-5
    assert mdr.main(paths) == 0 and '"mean": 0.5' in capsys.readouterr().out
    other = {k.replace("attn1_to_q", "ff_net_2"): v for k, v in merged.items()}
    save_file(other, paths[-1])
    assert mdr.main(paths) == 2 and "re-weights no" in capsys.readouterr().err


def test_objective_probe_checks_its_pair_and_files_in_one_line(capsys):
    import lorarar_objective_probe as lop

    assert lop.main(["--pair", "inkvel", "zorbo"]) == 2
    assert lop.main(["--pair", "zorbo", "inkvel", "--hypernet", "/no/such/hypernet.safetensors"]) == 2
    assert lop.main(["--pair", "zorbo", "inkvel", "--steps", "100", "0", "--ref-num", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3
    assert "--pair inkvel zorbo" in err[0] and "pixlor" in err[0]
    assert "/no/such/hypernet.safetensors" in err[1]
    assert "--steps 0" in err[2] and "--ref-num 0" in err[2] and "--steps 100" not in err[2]


def test_objective_probe_reads_kept_fractions_of_a_merge():
    """A merge exported with content coefficients 0.5 and style 1 keeps 0.5 / 1.0 of the two deltas."""
    import torch

    import lorarar_objective_probe as lop
    from lorakit.adapters.io import Adapter
    from lorakit.adapters.lora import LoraModule
    from lorakit.fusion.ziplora import export_merged, plan_merge

    g = torch.Generator().manual_seed(0)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"

    def lora():
        return Adapter(modules={key: LoraModule(down=torch.randn(2, 8, generator=g), up=torch.randn(8, 2, generator=g),
                                                alpha=2.0)}, metadata={})

    content, style = lora(), lora()
    plan = plan_merge(content, style, ("to_q",))
    coeffs = {k: (torch.full((8,), 0.5), torch.ones(8)) for k in (layer.key for layer in plan.merged)}
    merged = export_merged(plan, coeffs)
    got = lop.kept(content, style, merged)
    assert got == {"content_kept_mean": 0.5, "style_kept_mean": 1.0}
