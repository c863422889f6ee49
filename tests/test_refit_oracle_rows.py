"""tools/refit_oracle_rows.py: a refitted concept gets a new output, every other concept scores bit for bit as before."""

from __future__ import annotations

import importlib
import json

import torch

from lorakit.fileio import load_safetensors
from lorakit.toyworld.v2.oracle import Oracle

SMALL = ["--n-plain", "8", "--n-identity", "4", "--hard-negatives", "3", "--n-eval", "6", "--threads", "1"]


def _logits(folder, x):
    oracle = Oracle.load(folder)
    with torch.no_grad():
        return oracle.net(x), oracle.concepts


def test_refit_changes_only_the_named_rows_and_keeps_earlier_refits(tmp_path):
    tool = importlib.import_module("refit_oracle_rows")  # tools/ is on sys.path (conftest)
    x = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    before, concepts = _logits("data/toy2-oracle", x)
    first, second = tmp_path / "pixlor", tmp_path / "pixlor+inkvel"
    assert tool.main(["--oracle", "data/toy2-oracle", "--rows", "pixlor", "--out", str(first), *SMALL]) == 0
    after, _ = _logits(first, x)
    p, k = concepts.index("pixlor"), concepts.index("inkvel")
    others = [i for i in range(len(concepts)) if i != p]
    assert torch.equal(after[:, others], before[:, others])
    assert not torch.allclose(after[:, p], before[:, p])
    config = json.loads((first / "config.json").read_text())
    assert config["row_heads"] == ["pixlor"] and config["refit"]["from"] == "data/toy2-oracle"
    assert "pixlor" in json.loads((first / "metrics.json").read_text())["refit"]["rows"]

    assert tool.main(["--oracle", str(first), "--rows", "inkvel", "--out", str(second), *SMALL]) == 0
    again, _ = _logits(second, x)
    w1, w2 = (load_safetensors(f / "oracle.safetensors")[0]["row_head.weight"] for f in (first, second))
    assert torch.equal(w2[0], w1[0])  # the earlier refit kept, weight for weight
    assert torch.allclose(again[:, p], after[:, p], atol=1e-5)  # (a 2-row matmul may round differently)
    assert not torch.allclose(again[:, k], after[:, k])
    rest = [i for i in others if i != k]
    assert torch.equal(again[:, rest], before[:, rest])
    assert json.loads((second / "config.json").read_text())["row_heads"] == ["pixlor", "inkvel"]


def test_refit_refuses_an_existing_folder_an_unknown_name_and_a_non_identity(tmp_path, capsys):
    from lorakit.errors import run_guarded

    tool = importlib.import_module("refit_oracle_rows")
    for argv, said in ((["--rows", "pixlor", "--out", str(tmp_path)], "already exists"),
                       (["--rows", "frog", "--out", str(tmp_path / "new")], "not a v2 identity"),
                       (["--rows", "pixlr", "--out", str(tmp_path / "new")], "unknown toy-world v2 concept 'pixlr'")):
        assert run_guarded(lambda argv=argv: tool.main(argv + SMALL), "refit_oracle_rows") == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1
    assert not (tmp_path / "new").exists()
