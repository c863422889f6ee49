"""Bad inputs: one clear line and exit 2, or a correct result with a warning; never a silent wrong result or a
traceback (issue 13, cases 7, 8, 9 and 10)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.adapters.io import Adapter, AdapterError, LoraModule, load_adapter, save_adapter
from lorakit.cli import main
from lorakit.data import DatasetError, open_rgb, resize_crop, scan_folder

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "train_configs" / "toy_character.yaml")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    if "--- Logging error ---" not in err:  # a library logger left holding an earlier test's closed stream
        assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("lorakit") and not ln.startswith("lorakit: warning")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------------ images


def test_16bit_greyscale_png_is_not_white(tmp_path):
    arr = np.full((8, 8), 32768, np.uint16)  # mid grey in 16 bits
    Image.fromarray(arr).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode.startswith("I")  # what made convert("RGB") saturate to white
    rgb = np.asarray(open_rgb(tmp_path / "g16.png"))
    assert rgb.shape == (8, 8, 3) and abs(int(rgb.mean()) - 128) <= 1


def test_palette_with_transparency_goes_on_white(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 1)
    img.info["transparency"] = 0  # palette index 0 (black) is transparent
    img.save(tmp_path / "p.png", transparency=0)
    rgb = np.asarray(open_rgb(tmp_path / "p.png"))
    assert tuple(rgb[0, 0]) == (255, 0, 0) and tuple(rgb[1, 1]) == (255, 255, 255)


def test_extreme_aspect_ratio_resamples_only_the_crop(tmp_path):
    g = np.random.default_rng(0)
    img = Image.fromarray(g.integers(0, 255, (400, 8, 3), dtype=np.uint8))  # 8 wide, 400 tall
    out, _ = resize_crop(img, (32, 32), True, None)  # covering resize would be 32 x 1600: the box path
    ref = img.resize((32, 1600), Image.BICUBIC).crop((0, 784, 32, 816))
    assert out.size == (32, 32)
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(ref, np.int16))
    assert diff.mean() < 3  # the same view, up to resampling at the crop border
    huge = Image.new("RGB", (4, 20000))  # issue case 8: would resize to 512 x 2,560,000 (3.9 GB)
    out, _ = resize_crop(huge, (512, 512), True, None)
    assert out.size == (512, 512)


def test_latin1_caption_names_the_file(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"a\.txt: not UTF-8"):
        scan_folder(tmp_path)


def test_images_without_captions_are_counted(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    (tmp_path / "0.txt").write_text("a cat")
    with pytest.warns(UserWarning, match="2 of 3 images"):
        recs = scan_folder(tmp_path)
    assert [r.caption for r in recs] == ["a cat", "", ""]


# ------------------------------------------------------------------------------------------------ configs


def test_yaml_syntax_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: 10\n  oops: [1, 2\n")
    assert main(["train", "blockwise", "--config", str(bad)]) == 2
    line = _one_line(capsys)
    assert "bad.yaml: YAML syntax error at line 2" in line


def test_missing_environment_variable_is_one_line(capsys):
    assert main(["train", "blockwise", "--config", TOY, "base_model=${oc.env:LORAKIT_SURELY_UNSET}"]) == 2
    assert "LORAKIT_SURELY_UNSET" in _one_line(capsys)


@pytest.mark.parametrize("override,needle", [
    ("learning_rate=-1e-4", "learning_rate=-0.0001: expected a positive number"),
    ("gradient_accumulation_steps=0", "gradient_accumulation_steps=0: expected >= 1"),
])
def test_bad_numbers_fail_before_any_model_loads(tmp_path, capsys, override, needle):
    rc = main(["train", "blockwise", "--config", TOY, f"output_dir={tmp_path / 'o'}", "base_model=/nonexistent/x",
               override])
    assert rc == 2 and needle in _one_line(capsys)  # not "base model not found": checked first


def test_train_script_has_the_same_boundary(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [\n")
    run = subprocess.run([sys.executable, str(ROOT / "train_blockwise.py"), "--config", str(bad)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("train_blockwise.py: error: ")
    debug = subprocess.run([sys.executable, str(ROOT / "train_blockwise.py"), "--config", str(bad), "--debug"],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_error_boundary_kinds():
    from lorakit.errors import run_guarded

    def boom():
        raise RuntimeError("line one\nline two")

    assert run_guarded(lambda: 0, "x") == 0
    assert run_guarded(lambda: (_ for _ in ()).throw(ValueError("bad --x")), "x") == 2
    assert run_guarded(boom, "x") == 1  # a bug: one line, exit 1, says how to see the traceback
    with pytest.raises(RuntimeError):
        run_guarded(boom, "x", debug=True)


# ------------------------------------------------------------------------------------------------ base models


def test_base_path_typo_is_not_found_not_a_hub_lookup(tmp_path, monkeypatch):
    from lorakit.models import load_base

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(FileNotFoundError, match=r"base model not found: models/sd15.*local folder"):
        load_base("models/sd15")
    with pytest.raises(FileNotFoundError, match="base model not found"):
        load_base("./my_model")


def test_pipeline_folder_with_pickle_weights_is_refused(tmp_path, sd1_pipe):
    from lorakit.models import load_base

    sd1_pipe.save_pretrained(tmp_path / "p", safe_serialization=False)
    with pytest.raises(ValueError, match=r"holds pickle weights .*\.bin.*never loads pickles"):
        load_base(tmp_path / "p")


# ------------------------------------------------------------------------------------------------ adapters


def _adapter(path, value=None):
    g = torch.Generator().manual_seed(0)
    down = torch.randn(2, 32, generator=g)
    if value is not None:
        down[0, 0] = value
    mods = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
            LoraModule(down, torch.randn(32, 2, generator=g), 2.0)}
    return save_adapter(Adapter(modules=mods, metadata={"lorakit.base_arch": "sd1"}), path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_is_refused_by_every_command(tmp_path, capsys, value):
    bad = _adapter(tmp_path / "bad.safetensors", value)
    good = _adapter(tmp_path / "good.safetensors")
    with pytest.raises(AdapterError, match=r"bad.safetensors: .*lora_down(\.weight)? holds NaN/inf"):
        load_adapter(bad)
    assert main(["inspect", str(bad)]) == 2
    assert "NaN/inf" in _one_line(capsys)
    assert main(["fuse", "--method", "weighted", "--adapters", str(bad), str(good),
                 "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "NaN/inf" in _one_line(capsys)
    assert main(["sample", "--base", "tiny:sd1", "--adapters", str(bad), "--prompt", "x", "--steps", "1",
                 "--out", str(tmp_path / "s")]) == 2
    assert "NaN/inf" in _one_line(capsys)
    assert not (tmp_path / "m.safetensors").exists() and not list((tmp_path).glob("s/*.png"))


def test_fuse_weights_must_be_finite(tmp_path, capsys):
    a = _adapter(tmp_path / "a.safetensors")
    assert main(["fuse", "--method", "weighted", "--adapters", str(a), str(a), "--weights", "nan", "1",
                 "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "expected finite numbers" in _one_line(capsys)


def test_merge_into_a_base_without_the_layer_names_it(sd1_pipe):
    import copy

    from lorakit.fusion.merge import apply_deltas

    mods = {"unet.no_such_block.to_q": LoraModule(torch.zeros(1, 4), torch.zeros(4, 1), 1.0)}
    with pytest.raises(ValueError, match="no layer unet.no_such_block.to_q"):
        apply_deltas(copy.deepcopy(sd1_pipe), mods)


def test_rank_above_layer_width_warns(sd1_pipe):
    from lorakit.blocks import lora_able_modules
    from lorakit.training.blockwise import warn_rank_above_width

    names = [n for n, i in lora_able_modules(sd1_pipe.unet).items() if i.family == "attn"]
    with pytest.warns(UserWarning, match="network.rank=4096 is above the width"):
        n = warn_rank_above_width(sd1_pipe.unet, {k: (4096, 4096.0) for k in names}, "network.rank")
    assert n == len(names)
    assert warn_rank_above_width(sd1_pipe.unet, {k: (2, 2.0) for k in names}, "network.rank") == 0


# ------------------------------------------------------------------------------------------------ writes


def test_profile_cache_on_a_read_only_place_is_skipped(tmp_path, monkeypatch):
    import lorakit.fileio
    from lorakit.sampling.frequency import profile_path, write_cached

    ad = tmp_path / "a.safetensors"
    ad.write_bytes(b"x")

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(lorakit.fileio, "write_json", read_only)
    with pytest.warns(UserWarning, match="cannot cache the profile"):
        assert write_cached(ad, "k", {"v": 1}) is None
    monkeypatch.undo()
    profile_path(ad).write_text("user notes")  # not ours: never replaced
    assert write_cached(ad, "k", {"v": 1}) is None and profile_path(ad).read_text() == "user notes"


def test_sample_never_overwrites_foreign_images(tmp_path):
    from lorakit.outputs import OutputError
    from lorakit.sampling import _check_not_foreign

    (tmp_path / "000-0000-s0.png").write_bytes(b"my photo")
    with pytest.raises(OutputError, match="000-0000-s0"):
        _check_not_foreign(tmp_path, ["000-0000-s0"])
    (tmp_path / "000-0000-s0.json").write_text(json.dumps({"lorakit.sidecar": 1}))
    _check_not_foreign(tmp_path, ["000-0000-s0"])  # an earlier lorakit sample: replaced


def test_toyworld_render_never_replaces_a_file(tmp_path, capsys):
    f = tmp_path / "x.png"
    f.write_bytes(b"mine")
    assert main(["toyworld", "render", "--out", str(f)]) == 2
    assert "already exists" in _one_line(capsys) and f.read_bytes() == b"mine"


def test_fused_adapter_never_keeps_layers_the_base_lacks(tmp_path, capsys):
    """Issue 13 case 7: with --base given, a merge naming layers the base does not have is refused."""
    g = torch.Generator().manual_seed(0)
    mods = {"unet.no_such_block.to_q": LoraModule(torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g), 2.0)}
    odd = save_adapter(Adapter(modules=mods, metadata={"lorakit.base_arch": "sd1"}), tmp_path / "odd.safetensors")
    good = _adapter(tmp_path / "good.safetensors")
    assert main(["fuse", "--method", "weighted", "--adapters", str(good), str(odd), "--base", "tiny:sd1",
                 "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "has no layer unet.no" in _one_line(capsys)  # (kohya names lose the underscores)
    assert not (tmp_path / "m.safetensors").exists()
    assert main(["fuse", "--method", "weighted", "--adapters", str(good), "--base", "tiny:sd1",
                 "--out", str(tmp_path / "ok.safetensors")]) == 0
