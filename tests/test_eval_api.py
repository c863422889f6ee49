"""``lorakit.eval`` from Python: the same metric, settings and files as ``lorakit eval``."""

import json

import pytest

from lorakit.adapters.io import save_adapter
from lorakit.eval import METRICS, RetentionSettings, default_out, evaluate, evaluate_to_files
from lorakit.testing import random_adapter


def test_every_metric_has_settings_with_the_shared_fields():
    import lorakit.toyworld  # noqa: F401  (registers the toy world's oracle)

    assert list(METRICS) == ["clipscore", "judge", "retention", "oracle"]
    for metric in METRICS.values():
        assert metric.settings().batch_size == 16 and metric.settings().out is None
    assert str(default_out("retention", RetentionSettings())) == "eval_retention"
    assert default_out("judge", METRICS["judge"].settings(images="imgs", protocol="yesno")).as_posix() == \
        "imgs/eval_judge_yesno"


def test_evaluation_needs_no_toy_world_and_the_toy_world_registers_its_oracle():
    """lorakit.eval never imports the toy world; importing the toy world adds its metric and trigger descriptions."""
    import subprocess
    import sys

    code = ("import sys; from lorakit.eval import METRICS, evaluate; from lorakit.eval.metrics import _described; "
            "from lorakit.eval.images import Concept; "
            "assert 'oracle' not in METRICS and not any(m.startswith('lorakit.toyworld') for m in sys.modules)\n"
            "try: evaluate('oracle')\nexcept ValueError as e: print(e)\n"
            "assert _described(Concept('zorbo')) == Concept('zorbo')\n"
            "import lorakit.toyworld; from lorakit.toyworld.metrics import OracleSettings\n"
            "assert METRICS['oracle'].settings is OracleSettings and _described(Concept('zorbo')).category == 'character'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "metric 'oracle': expected one of clipscore, judge, retention" in out.stdout
    assert "`import lorakit.toyworld` for 'oracle'" in out.stdout


def test_retention_from_python_matches_the_command(sd1_pipe, tmp_path):
    from lorakit.cli import main

    adapter = random_adapter(sd1_pipe, blocks={"OUT2": 4}, seed=4, std=0.2)
    save_adapter(adapter, tmp_path / "a.safetensors")
    settings = RetentionSettings(base="tiny:sd1:0", adapters=(str(tmp_path / "a.safetensors"),), fused="merge:1.0",
                                 prompts=("red cat",), samples=1, device="cpu", out=str(tmp_path / "py"))
    scored = evaluate("retention", settings)
    assert scored.result["concepts"][0]["projection"] == pytest.approx(1.0, abs=1e-5)  # merge:1 of one adapter
    assert scored.headers[0] == "concept" and scored.rows[-1][0] == "mean"
    _, js, md = evaluate_to_files("retention", settings)
    assert main(["eval", "--metric", "retention", "--base", "tiny:sd1:0", "--adapters", str(tmp_path / "a.safetensors"),
                 "--fused", "merge:1.0", "--prompts", "red cat", "--samples", "1", "--device", "cpu",
                 "--out", str(tmp_path / "cli")]) == 0
    assert json.loads(js.read_text()) == json.loads((tmp_path / "cli.json").read_text())
    assert md.read_text() == (tmp_path / "cli.md").read_text()
    with pytest.raises(ValueError, match="--metric retention needs --base"):
        evaluate("retention", RetentionSettings(adapters=("a.safetensors",), fused="merge"))
