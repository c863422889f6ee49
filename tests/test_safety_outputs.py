"""lorakit never removes or overwrites what it did not write (issue 13, case 1 and the minor write cases)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from lorakit.adapters.io import Adapter, LoraModule, save_adapter
from lorakit.cli import main
from lorakit.outputs import MARKER, OutputError, clean_stale, replace_dir


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _adapter_file(path, seed=0):
    g = torch.Generator().manual_seed(seed)
    mods = {"unet.a.to_q": LoraModule(torch.randn(2, 7, generator=g), torch.randn(5, 2, generator=g), 2.0)}
    return save_adapter(Adapter(modules=mods, metadata={"lorakit.base_arch": "sd1"}), path)


def test_make_tiny_never_deletes_a_users_folder(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    for extra in ([], ["--overwrite"]):
        assert main(["make-tiny", "--arch", "sd1", "--out", str(mine), *extra]) == 2
        assert "did not write" in _err_line(capsys)
        assert (mine / "notes.txt").read_text() == "x" and sorted(os.listdir(mine)) == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["mine"]  # nothing renamed aside, no temp left


def test_make_tiny_refuses_an_existing_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep")
    assert main(["make-tiny", "--out", str(f), "--overwrite"]) == 2
    assert "not a folder" in _err_line(capsys)
    assert f.read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["file"]


def test_make_tiny_replaces_its_own_folder_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "tiny"
    out.mkdir()  # an empty folder is fine
    assert main(["make-tiny", "--out", str(out)]) == 0
    assert (out / MARKER).is_file() and (out / "model_index.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # mkdir's permissions, not mkdtemp's 0700
    capsys.readouterr()
    assert main(["make-tiny", "--out", str(out), "--seed", "1"]) == 2
    assert "--overwrite" in _err_line(capsys)
    (out / "stamp").write_text("old")
    assert main(["make-tiny", "--out", str(out), "--seed", "1", "--overwrite"]) == 0
    assert not (out / "stamp").exists() and (out / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_replace_dir_keeps_the_old_folder_when_building_fails(tmp_path):
    out = tmp_path / "p"

    def build(tmp):
        (tmp / "a").write_text("1")

    replace_dir(out, build, kind="test")

    def broken(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        replace_dir(out, broken, kind="test", overwrite=True)
    assert (out / "a").read_text() == "1" and not (out / "half").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_fuse_refuses_an_input_as_output_and_foreign_files(tmp_path, capsys):
    a = _adapter_file(tmp_path / "a.safetensors", 0)
    b = _adapter_file(tmp_path / "b.safetensors", 1)
    before = a.read_bytes()
    for extra in ([], ["--overwrite"]):
        assert main(["fuse", "--method", "cat", "--adapters", str(a), str(b), "--out", str(a), *extra]) == 2
        assert "also an input" in _err_line(capsys)
    assert a.read_bytes() == before
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"user data")
    assert main(["fuse", "--method", "cat", "--adapters", str(a), str(b), "--out", str(foreign), "--overwrite"]) == 2
    assert "not written by lorakit" in _err_line(capsys)
    assert foreign.read_bytes() == b"user data"
    out = tmp_path / "m.safetensors"
    assert main(["fuse", "--method", "cat", "--adapters", str(a), str(b), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["fuse", "--method", "cat", "--adapters", str(a), str(b), "--out", str(out)]) == 2
    assert "--overwrite" in _err_line(capsys)
    assert main(["fuse", "--method", "weighted", "--adapters", str(a), str(b), "--out", str(out), "--overwrite"]) == 0


def test_fuse_pipeline_never_replaces_a_users_folder(tmp_path, capsys):
    a = _adapter_file(tmp_path / "a.safetensors", 0)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    assert main(["fuse", "--method", "weighted", "--adapters", str(a), "--base", "tiny:sd1",
                 "--out-format", "pipeline", "--out", str(mine), "--overwrite"]) == 2
    assert "did not write" in _err_line(capsys)
    assert sorted(os.listdir(mine)) == ["notes.txt"]
    # a folder holding an input is never an output
    assert main(["fuse", "--method", "weighted", "--adapters", str(a), "--base", "tiny:sd1",
                 "--out-format", "pipeline", "--out", str(tmp_path), "--overwrite"]) == 2
    assert "input" in _err_line(capsys)


def test_stale_temp_files_of_a_killed_writer_are_cleaned(tmp_path):
    stale = tmp_path / ".out.abc123.lorakit-tmp"
    stale.mkdir()
    (stale / MARKER).write_text("{}")
    old_file = tmp_path / ".x.safetensors.k2j3.tmp"
    old_file.write_text("half")
    fresh = tmp_path / ".out.new999.lorakit-tmp"
    fresh.mkdir()
    user = tmp_path / ".out.mine"  # not ours: never touched
    user.write_text("u")
    past = time.time() - 7200
    for p in (stale, old_file, user):
        os.utime(p, (past, past))
    clean_stale(tmp_path, "out")
    clean_stale(tmp_path, "x.safetensors")
    assert not stale.exists() and not old_file.exists() and fresh.exists() and user.exists()


def test_output_error_is_a_value_error():
    assert issubclass(OutputError, ValueError)


def test_folders_are_swapped_atomically(tmp_path):
    """Issue 13 case 10: no moment where only a hidden `.NAME.old` exists (Linux renameat2 exchange)."""
    from lorakit.outputs import _exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    assert _exchange(a, b)
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_demo_never_writes_among_foreign_files(tmp_path, capsys):
    from lorakit.toyworld.demo import _claim_demo_folder

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.html").write_text("my own report")
    (mine / "notes.txt").write_text("x")
    assert main(["demo", "--out", str(mine)]) == 2
    assert "did not write" in _err_line(capsys) and (mine / "report.html").read_text() == "my own report"
    old = tmp_path / "demo_out"  # a demo folder of an earlier lorakit (no marker, only the demo's names)
    (old / "images").mkdir(parents=True)
    (old / "report.json").write_text("{}")
    _claim_demo_folder(old)
    assert (old / MARKER).is_file()


def test_eval_report_never_overwrites_foreign_files(tmp_path):
    from lorakit.eval.report import check_report_paths, write_report

    (tmp_path / "r.md").write_text("my notes")
    with pytest.raises(OutputError, match="not a lorakit report"):
        write_report({"metric": "x"}, tmp_path / "r", "t", ["a"], [[1]])
    assert (tmp_path / "r.md").read_text() == "my notes"
    write_report({"metric": "x"}, tmp_path / "s", "t", ["a"], [[1]])
    write_report({"metric": "x", "n": 2}, tmp_path / "s.json", "t", ["a"], [[2]])  # its own earlier report
    assert check_report_paths(tmp_path / "s.md") == tmp_path / "s"
