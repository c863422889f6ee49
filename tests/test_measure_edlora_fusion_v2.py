"""tools/measure_edlora_fusion_toy.py --world v2: sets of v2 ED-LoRA identities, their prompts, the cache key, and
one end-to-end run on a random v2 pipeline, random ED-LoRAs and an untrained v2 oracle (plumbing only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_v2_set_prompts_hold_every_identity_as_pseudo_words_with_its_class():
    from measure_edlora_fusion_toy import set_prompts, with_words

    names = ["zorbo", "kwibbit", "hattock", "shroomel"]
    words = {n: f"<{n}1> <{n}2>" for n in names}
    raw = set_prompts(names, 12, "v2")
    assert raw == set_prompts(names, 12, "v2") and len(set(raw)) > 3  # seeded, varied backgrounds
    assert all(p.startswith("zorbo robot, kwibbit frog, hattock hat, shroomel mushroom, ") for p in raw)
    prompts = with_words(raw, names, words, "v2")
    assert all(p.startswith("<zorbo1> <zorbo2> robot, <kwibbit1> <kwibbit2> frog, <hattock1> <hattock2> hat")
               for p in prompts)


def test_v2_fit_prompts_are_training_style_captions_of_one_identity():
    from measure_edlora_fusion_toy import fit_prompts

    fit, val = fit_prompts("kwibbit", 0, "v2"), fit_prompts("kwibbit", 1, "v2")
    assert len(fit) == 4 and fit != val
    assert all(p.startswith("kwibbit frog") for p in fit + val)


def test_v2_sets_must_fit_one_scene():
    from measure_edlora_fusion_toy import check_set

    check_set(["zorbo", "kwibbit", "hattock"], "v2")
    with pytest.raises(SystemExit, match="at most two characters"):
        check_set(["zorbo", "kwibbit", "bloopo"], "v2")
    with pytest.raises(SystemExit, match="not a v2 ED-LoRA identity"):
        check_set(["zorbo", "inkvel"], "v2")


def test_v2_oracle_ceiling_scores_renders_of_the_evaluation_scenes():
    from measure_edlora_fusion_toy import many_prompts_v2, set_scenes_v2

    from lorakit.toyworld.v2.render import caption

    names = ["zorbo", "kwibbit", "hattock"]
    scenes = set_scenes_v2(names, 5)
    assert [caption(s) for s in scenes] == many_prompts_v2(names, 5)
    assert all(s.characters == ("zorbo", "kwibbit") and s.hat == "hattock" and s.mushroom is None for s in scenes)


def test_v2_cache_key_covers_base_and_oracle(tmp_path):
    from measure_edlora_fusion_toy import result_path

    files = {"zorbo": "a/toy2_edlora_zorbo-1.safetensors", "kwibbit": "a/toy2_edlora_kwibbit-2.safetensors"}
    a = result_path(str(tmp_path), "zorbo+kwibbit", "gradient", files, 96, ("base1", "oracle1"))
    b = result_path(str(tmp_path), "zorbo+kwibbit", "gradient", files, 96, ("base1", "oracle2"))
    assert a != b and a.name.startswith("zorbo+kwibbit-gradient-n96-")


def _tiny_world(root: Path) -> tuple[Path, Path, Path]:
    import torch
    from safetensors.torch import save_file

    from lorakit.toyworld.v2.concepts import CONCEPTS
    from lorakit.toyworld.v2.edloras import train_identity_edlora_chunk
    from lorakit.toyworld.v2.models import build_toy_pipeline
    from lorakit.toyworld.v2.oracle import OracleNet

    build_toy_pipeline(0).save_pretrained(root / "pipe")
    torch.manual_seed(0)
    (root / "oracle").mkdir()
    save_file(OracleNet(len(CONCEPTS)).state_dict(), root / "oracle" / "oracle.safetensors")
    (root / "oracle" / "config.json").write_text(json.dumps({"world": "v2", "concepts": list(CONCEPTS)}))
    over = ["max_steps=1", "train_batch_size=2"]
    for name in ("zorbo", "kwibbit"):
        train_identity_edlora_chunk(name, root / "edloras", root / "pipe", 1, over)
    return root / "pipe", root / "oracle", root / "edloras"


@pytest.mark.slow
def test_v2_run_writes_rows_for_every_method_and_reads_them_back_from_the_cache(tmp_path, capsys):
    import measure_edlora_fusion_toy as tool

    pipe, oracle, edloras = _tiny_world(tmp_path)
    files = [f"{p.name.split('_')[2].split('-')[0]}={p}" for p in sorted(edloras.glob("toy2_edlora_*.safetensors"))]
    args = ["--world", "v2", "--base", str(pipe), "--oracle", str(oracle), "--edloras", *files,
            "--sets", "zorbo+kwibbit", "--n", "3", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "o.jsonl")]
    assert tool.main([*args, "--chunks", "1"]) == 3  # one (set, method) per call
    assert tool.main(args) == 0
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    by_method = {r["method"]: r for r in rows if "method" in r}
    assert set(by_method) == {"gradient", "weighted", "merge", "oracle_on_renders"}
    for r in by_method.values():
        assert r["world"] == "v2" and r["n"] == 3 and {"zorbo", "kwibbit", "all"} <= r.keys()
        assert 0 <= r["all"]["k"] <= min(r["zorbo"]["k"], r["kwibbit"]["k"]) <= 3
    assert all(by_method[m]["example_prompt"].startswith("<zorbo1> <zorbo2> robot, ") for m in tool.METHODS)
    pairs = [r for r in rows if "compare" in r]
    assert {r["compare"] for r in pairs} == {"gradient vs weighted", "gradient vs merge"}
    assert len(list((tmp_path / "cache").glob("zorbo+kwibbit-*.json"))) == 3
    capsys.readouterr()
    assert tool.main([*args, "--chunks", "1"]) == 0  # every result cached: nothing left to compute
    again = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert again == rows


def test_single_prompts_name_one_identity_and_never_a_prompt_the_fusion_captured_on():
    from measure_edlora_fusion_toy import fit_prompts, single_prompts

    for name, cls in [("zorbo", "robot"), ("kwibbit", "frog"), ("hattock", "hat"), ("shroomel", "mushroom")]:
        prompts = single_prompts(name, 64)
        assert len(prompts) == 64 and prompts == single_prompts(name, 64)
        assert all(p.startswith(f"{name} {cls}, ") and p.count(",") == 1 for p in prompts)
        assert len(set(prompts)) >= 8  # every generic caption left over, in turn
        assert not set(prompts) & set(fit_prompts(name, 0, "v2") + fit_prompts(name, 1, "v2"))


def test_single_rows_pool_the_identities_and_mcnemar_pairs_the_same_images():
    from measure_edlora_fusion_toy import compare_single, single_row

    kept = {"gradient": {"a": [1, 1, 0, 1], "b": [0, 1, 1, 1]}, "weighted": {"a": [0, 1, 0, 0], "b": [0, 1, 1, 0]}}
    row = single_row("a+b", "gradient", kept["gradient"], "p")
    assert row["a"]["k"] == 3 and row["pooled"] == {**row["pooled"], "k": 6, "n": 8, "rate": 0.75}
    assert row["pooled"]["ci95"][0] < 0.75 < row["pooled"]["ci95"][1]
    out = []
    compare_single(out.append, "a+b", "gradient", "weighted", kept)
    by_on = {r["on"]: (r["wins"], r["losses"], r["n"]) for r in out}
    assert by_on == {"a": (2, 0, 4), "b": (1, 0, 4), "pooled": (3, 0, 8)}


def test_single_cache_names_the_identity_and_unfused_is_shared_by_every_set(tmp_path):
    from measure_edlora_fusion_toy import single_path

    files = {"zorbo": "a/toy2_edlora_zorbo-1.safetensors", "kwibbit": "a/k-2.safetensors", "hattock": "a/h-3.st"}
    a = single_path(str(tmp_path), "zorbo+kwibbit", "gradient", "zorbo", files, 64, ("b", "o"))
    b = single_path(str(tmp_path), "zorbo+kwibbit+hattock", "gradient", "zorbo", files, 64, ("b", "o"))
    assert a != b and a.name.startswith("zorbo+kwibbit-gradient-zorbo-single-n64-")
    u2 = single_path(str(tmp_path), "zorbo+kwibbit", "unfused", "zorbo", files, 64, ("b", "o"))
    u3 = single_path(str(tmp_path), "zorbo+kwibbit+hattock", "unfused", "zorbo", files, 64, ("b", "o"))
    assert u2 == u3 != single_path(str(tmp_path), "zorbo+kwibbit", "unfused", "zorbo", files, 64, ("b", "o2"))


@pytest.mark.slow
def test_v2_single_eval_scores_each_identity_alone_resumably(tmp_path, capsys):
    import measure_edlora_fusion_toy as tool

    pipe, oracle, edloras = _tiny_world(tmp_path)
    files = [f"{p.name.split('_')[2].split('-')[0]}={p}" for p in sorted(edloras.glob("toy2_edlora_*.safetensors"))]
    args = ["--world", "v2", "--base", str(pipe), "--oracle", str(oracle), "--edloras", *files, "--eval", "single",
            "--sets", "zorbo+kwibbit", "--n", "2", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "o.jsonl")]
    assert tool.main([*args, "--chunks", "3"]) == 3  # one (set, method, identity) per unit
    assert len(list((tmp_path / "cache").glob("*.json"))) == 3
    assert tool.main(args) == 0
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    by_method = {r["method"]: r for r in rows if "method" in r}
    assert set(by_method) == {"gradient", "weighted", "merge", "unfused"}
    for r in by_method.values():
        assert r["eval"] == "single" and r["zorbo"]["n"] == r["kwibbit"]["n"] == 2 and r["pooled"]["n"] == 4
        assert r["pooled"]["k"] == r["zorbo"]["k"] + r["kwibbit"]["k"]
    assert by_method["gradient"]["example_prompt"].startswith("<zorbo1> <zorbo2> robot, ")
    pairs = {(r["compare"], r["on"]) for r in rows if "compare" in r}
    assert ("gradient vs weighted", "pooled") in pairs and ("gradient vs unfused", "kwibbit") in pairs
    assert len(list((tmp_path / "cache").glob("*.json"))) == 8  # 3 methods x 2 identities + 2 unfused
    capsys.readouterr()
    assert tool.main([*args, "--chunks", "1"]) == 0  # all cached
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == rows


def test_single_eval_options_are_checked_in_one_line_with_status_2():
    import subprocess
    import sys

    for extra in (["--eval", "single"], ["--world", "v2", "--methods", "gradient", "unfused"]):
        r = subprocess.run([sys.executable, "tools/measure_edlora_fusion_toy.py", "--sets", "zorbo+kwibbit", *extra],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("measure_edlora_fusion_toy: error:")
