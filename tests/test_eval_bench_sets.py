"""tools/bench_composition.py: the composition sets and the check of its inputs (the run itself is a benchmark)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_composition", ROOT / "tools" / "bench_composition.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sets_cover_every_combination(bench):
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


def test_missing_inputs_are_named(bench, tmp_path, sd1_pipe, capsys):
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
