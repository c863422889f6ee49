"""tools/bench_composition.py: the composition sets and the check of its inputs (the run itself is a benchmark)."""

import bench_composition as bench
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_sets_cover_every_combination():
    sets = bench.composition_sets((2, 3, 4))
    counts = {n: sum(s["n"] == n for s in sets) for n in (2, 3, 4)}
    assert counts == {2: 18, 3: 36, 4: 24}  # 3 characters x (2+2+2 | 4+4+4 | 8)
    assert len({s["id"] for s in sets}) == 78
    s = next(s for s in sets if s["id"] == "n4-robot-tophat-ink-checker")
    assert s["concepts"] == {"character": "robot", "object": "tophat", "style": "ink", "background": "checker"}
    assert s["prompt"] == "zorbo, hattock, chekka, inkvel"
    sample = bench.composition_sets((2, 3), per_size=5, seed=1)
    assert [x["n"] for x in sample] == [2] * 5 + [3] * 5 and sample == bench.composition_sets((2, 3), per_size=5, seed=1)
    with pytest.raises(ValueError, match="set size 5"):
        bench.composition_sets((5,))


def test_missing_inputs_are_named(tmp_path, sd1_pipe, capsys):
    from lorakit.adapters.io import adapter_metadata, save_adapter
    from lorakit.testing import random_adapter

    a = random_adapter(sd1_pipe, blocks={"OUT3": 2}, rank=2)
    a.metadata.update(adapter_metadata("sd1", "lora", trigger="zorbo"))
    save_adapter(a, tmp_path / "x.safetensors")
    assert {k: v.name for k, v in bench.find_adapters(tmp_path).items()} == {"robot": "x.safetensors"}
    args = bench.parse_args(["--base", str(tmp_path / "nobase"), "--adapters-dir", str(tmp_path), "--methods", "merge",
                             "lorarar", "--oracle", str(tmp_path / "noracle"), "--sizes", "2"])
    lines = bench.missing_inputs(args, bench.composition_sets((2,)))
    text = "\n".join(lines)
    assert "nobase" in text and "noracle" in text and "--hypernet" in text
    assert "frog" in text and "robot," not in text  # the robot adapter was found by its trigger
    assert bench.main(["--base", str(tmp_path / "nobase"), "--adapters-dir", str(tmp_path), "--sizes", "2"]) == 2
    assert "cannot run; missing" in capsys.readouterr().err
    assert bench.main(["--dry-run", "--sizes", "2", "--sets-per-size", "2"]) == 0
    out = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert len(out) == 2 and all("prompt" in o for o in out)


def _row(method, set_id, seeds, present, scale=0.8, n=2, cats=("character", "style")):
    return {"method": method, "n": n, "set": set_id, "seeds": seeds, "scale": scale, "categories": list(cats),
            "present": present, "seconds_per_image": 0.1}


def test_summary_counts_images_with_intervals_and_pairs_them():
    seeds = [0, 1, 2, 3]
    rows = [
        _row("merge", "a", seeds, [[True, True], [True, False], [False, False], [False, True]]),
        _row("merge", "b", seeds, [[False, False]] * 4),
        _row("gradient", "a", seeds, [[True, True]] * 4),
        _row("gradient", "b", seeds, [[True, True], [True, True], [False, True], [False, False]]),
    ]
    summary, headers, table = bench.summarize(rows, ["gradient", "merge"], [2])
    cell = summary["cells"]["gradient/n2"]
    assert cell["all_present"]["k"] == 6 and cell["all_present"]["n"] == 8 and cell["scale"] == 0.8
    lo, hi = cell["all_present"]["wilson95"]
    assert lo < 0.75 < hi
    assert summary["cells"]["merge/n2"]["all_present"]["k"] == 1
    assert summary["cells"]["merge/n2"]["per_category"]["character"]["k"] == 2
    # paired on the same (set, seed): gradient right where merge is wrong on 5 images, the reverse on 0
    assert summary["paired"] == [{"n_adapters": 2, "a": "gradient", "b": "merge", "pairs": 8, "wins": 5,
                                  "losses": 0, "p": 0.0625}]
    g = next(r for r in table if r[0] == "gradient")
    assert g[4].startswith("0.75 [") and "(6/8)" in g[4] and g[headers.index("vs merge: wins / losses, McNemar p")] \
        == "+5 / -0, p = 0.0625"


def test_scale_is_picked_on_validation_rows():
    rows = [_row("merge", "a", [10, 11], [[True, True], [False, True]], scale=0.6),
            _row("merge", "a", [10, 11], [[True, True], [True, True]], scale=1.0),
            _row("merge", "a", [10, 11], [[True, True], [True, True]], scale=0.8),
            _row("switch", "a", [10, 11], [[False, True], [False, True]], scale=0.6),
            _row("switch", "a", [10, 11], [[False, True], [False, True]], scale=1.0)]
    picked = bench.pick_scales(rows, ["merge", "switch"], [2], default=0.8)
    assert picked[("merge", 2)] == 0.8  # tie with 1.0: nearest the default
    assert picked[("switch", 2)] in (0.6, 1.0)


def test_every_method_gets_the_same_scale_and_fusion_its_training_captions(tmp_path, monkeypatch):
    caps = bench.training_captions("frog", 3)
    assert len(caps) == 3 and all(c.startswith("kwibbit") for c in caps)
    calls = []
    monkeypatch.setattr("lorakit.cli.main", lambda argv: calls.append(argv) or 0)
    args = bench.parse_args(["--methods", "gradient", "weighted", "--scale", "0.7", "--fusion-prompts", "2"])
    runner = bench.FusionRunner(args, {"frog": Path("f.safetensors"), "ink": Path("i.safetensors")}, tmp_path)
    set_ = {"id": "n2-frog-ink", "n": 2, "concepts": {"character": "frog", "style": "ink"}, "prompt": "kwibbit, inkvel"}
    for method in ("gradient", "weighted"):
        with pytest.raises(Exception):  # the fused output does not exist: we only look at the fuse command
            runner.run(method, set_, [0], 0.7)
    for argv in calls:
        assert argv[argv.index("--weights") + 1: argv.index("--weights") + 3] == ["0.7", "0.7"]
    grad = calls[0]
    frog_prompts = grad[grad.index("--prompts") + 1].split("|")
    assert frog_prompts == bench.training_captions("frog", 2)
    assert "photo of" not in " ".join(grad)
