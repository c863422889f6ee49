"""The trainers' command lines: --help lists every recipe key with its default without loading torch, and the
scripts, ``lorakit train`` and the modules' ``main`` parse the same way."""

import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.training import recipes
from lorakit.config import schema_defaults
from lorakit.training.entry import TRAINERS, build_parser

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_help_lists_every_key_with_its_default(name):
    text = build_parser(name).format_help()
    keys = schema_defaults(getattr(recipes, TRAINERS[name].schema))
    for key, default in keys:
        if any(key.startswith(p) for p in TRAINERS[name].hidden):
            assert f"  {key} " not in text
        else:
            assert f"  {key} " in text and repr(default) in text, key


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_every_shown_key_has_a_line_saying_what_it_does(name):
    lines = build_parser(name).format_help().split("recipe keys (default, meaning):\n")[1].splitlines()
    keys = [k for k, _ in schema_defaults(getattr(recipes, TRAINERS[name].schema))
            if not k.startswith(TRAINERS[name].hidden or ("\0",))]
    assert len(lines) == len(keys)
    for key, line in zip(keys, lines):
        words = line.split()
        assert words[0] == key and len(words) >= 4, f"{name}: {key} has no line saying what it does: {line!r}"
    assert TRAINERS[name].doc in build_parser(name).format_help()


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_lorakit_train_recipe_help_is_the_trainers_help(name, capsys):
    from lorakit.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["train", name, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lorakit train {name}") and "recipe keys (default, meaning):" in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "lorakit train RECIPE --help" in " ".join(capsys.readouterr().out.split())


def test_lorarar_help_hides_the_image_data_keys():
    text = build_parser("lorarar").format_help()
    assert "data.resolution" not in text and "synthetic.content" in text
    assert "sample_every" not in text and "text_encoder_lr" not in text  # the hypernetwork reads neither
    assert "data.resolution" in build_parser("blockwise").format_help()


@pytest.mark.parametrize("script", ["train_blockwise.py", "train_edlora.py", "train_lorarar.py"])
def test_script_help_does_not_import_torch(script):
    code = ("import runpy, sys; sys.argv = [%r, '--help']\n"
            "try:\n    runpy.run_path(%r, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')") % (script, str(REPO / script))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-1500:]
    assert "recipe keys (default, meaning):" in out.stdout and out.stdout.strip().endswith("NO-TORCH")


def test_unknown_key_is_one_line_exit_2(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "train_blockwise.py"), "max_stpes=3"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "max_stpes" in lines[0], out.stderr
