"""One precision resolver for every trainer: `mixed_precision: no` (YAML reads it as false) trains in fp32 in
each of them; the shared conditioning agrees with diffusers on SDXL time ids."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.conditioning import is_sdxl, pixel_size, sdxl_time_ids
from lorakit.config import load_config
from lorakit.models import pipeline_arch
from lorakit.precision import precision_name, torch_dtype

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value, name", [(False, "no"), ("no", "no"), ("fp32", "no"), (None, "no"), ("FP16", "fp16"),
                                         ("bf16", "bf16")])
def test_precision_names(value, name):
    assert precision_name(value, "mixed_precision") == name
    assert torch_dtype(value, "save_precision") == {"no": torch.float32, "fp16": torch.float16,
                                                    "bf16": torch.bfloat16}[name]


def test_unknown_precision_names_the_key():
    with pytest.raises(ValueError, match="save_precision='fp8'"):
        torch_dtype("fp8", "save_precision")


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def recipe(tmp_path: Path, body: str, save: bool = True) -> Path:
    """A YAML recipe with a bare `mixed_precision: no` (a YAML boolean) and `save_precision: fp32`."""
    path = tmp_path / "recipe.yaml"
    body += "\nsave_precision: fp32" if save else ""
    path.write_text(body + "\nmixed_precision: no\nlogging: none\ncheckpointing_steps: 0\n"
                    f"output_dir: {tmp_path / 'out'}\nmax_steps: 1\nbase_model: tiny:sd1\n")
    return path


def images(folder: Path, caption: str) -> Path:
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * (i + 1), np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


def test_blockwise_trains_with_mixed_precision_no(tmp_path):
    from lorakit.training.blockwise import BlockwiseConfig, train

    reset_accelerate()
    data = images(tmp_path / "d", "a cat")
    cfg = load_config(BlockwiseConfig, recipe(tmp_path, f"data:\n  path: {data}\n  resolution: 32"), [])
    assert cfg.mixed_precision != "no"  # YAML's false, as a string
    result = train(cfg)
    assert result.final_path.is_file() and np.isfinite(result.losses[-1])


def test_edlora_trains_with_mixed_precision_no(tmp_path):
    from lorakit.training.edlora import EDLoRAConfig, train

    reset_accelerate()
    data = images(tmp_path / "d", "a photo of <TOK>")
    body = (f"data:\n  path: {data}\n  resolution: 32\nconcept:\n  tokens: '<cat1> <cat2>'\n  init_word: cat\n"
            "  placeholder: <TOK>\nsample_every: 0")
    cfg = load_config(EDLoRAConfig, recipe(tmp_path, body), [])
    assert cfg.mixed_precision != "no"  # YAML's false, as a string
    result = train(cfg)
    assert result.final_path.is_file() and np.isfinite(result.losses[-1])


def test_lorarar_trains_with_mixed_precision_no(tmp_path):
    from lorakit.training.lorarar import LoraRarConfig, train

    reset_accelerate()
    body = ("synthetic:\n  content: 1\n  style: 1\n  images: random\nreference_size: 16\nnum_ref_images: 2\n"
            "checkpoint_at_end: false")
    cfg = load_config(LoraRarConfig, recipe(tmp_path, body, save=False), [])
    assert cfg.mixed_precision != "no"  # YAML's false, as a string
    result = train(cfg)
    assert result.final_path.is_file() and np.isfinite(result.losses[-1])


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_is_sdxl_agrees_with_the_architecture(arch, request):
    pipe = request.getfixturevalue(f"{arch}_pipe")
    assert is_sdxl(pipe) == (pipeline_arch(pipe) == "sdxl")
    assert pixel_size(pipe) == 32


def test_sdxl_time_ids_equal_diffusers(sdxl_pipe):
    ours = sdxl_time_ids((48, 40), (4, 2), (32, 32), rows=3, dtype=torch.float16)
    theirs = sdxl_pipe._get_add_time_ids(  # diffusers' own (private) helper, as the reference only
        (48, 40), (4, 2), (32, 32), dtype=torch.float16,
        text_encoder_projection_dim=sdxl_pipe.text_encoder_2.config.projection_dim,
    ).repeat(3, 1)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
