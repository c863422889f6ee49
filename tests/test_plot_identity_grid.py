"""tools/plot_identity_grid.py: clear errors for bad input, and the oracle's verdict drawn under each image."""

from __future__ import annotations

import importlib

import numpy as np
from PIL import Image


def test_refuses_a_class_concept_and_a_missing_lora_in_one_line(tmp_path, capsys):
    from lorakit.errors import run_guarded

    tool = importlib.import_module("plot_identity_grid")  # tools/ is on sys.path (conftest)
    for argv, said in ((["frog", str(tmp_path / "x.safetensors")], "made for the identities"),
                       (["pixlor", str(tmp_path / "missing.safetensors")], "no such LoRA file")):
        assert run_guarded(lambda argv=argv: tool.main(argv + ["--out", str(tmp_path / "g.png")]), "p") == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1
    assert not (tmp_path / "g.png").exists()


def test_verdict_bar_is_green_when_found_and_red_when_not():
    tool = importlib.import_module("plot_identity_grid")
    img = Image.new("RGB", (8, 8), (255, 255, 255))
    found, missed = tool.with_verdict(img, True), tool.with_verdict(img, False)
    assert found.shape == missed.shape == (11, 8, 3)
    assert (found[:8] == 255).all() and (found[8:] == (40, 170, 60)).all() and (missed[8:] == (200, 40, 40)).all()
    assert not np.array_equal(found, missed)
