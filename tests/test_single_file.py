"""Single-file (original LDM layout) checkpoints: diffusers' ``from_single_file`` loads them back exactly."""

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from lorakit.adapters.io import save_adapter
from lorakit.cli import main
from lorakit.models import save_pipeline, tiny_unet
from lorakit.single_file import pipeline_to_ldm, save_single_file
from lorakit.testing import random_adapter

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _distinct_sdxl(sdxl_pipe):
    """The tiny SDXL pipeline with a 48-wide second text encoder: diffusers tells SDXL's two encoders apart by
    width, which the stock tiny pipeline (32 and 32) does not allow."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    pipe = copy.deepcopy(sdxl_pipe)
    cfg = CLIPTextConfig(**{**pipe.text_encoder_2.config.to_dict(), "hidden_size": 48, "intermediate_size": 96,
                            "projection_dim": 32})
    torch.manual_seed(1)
    pipe.text_encoder_2 = CLIPTextModelWithProjection(cfg)
    pipe.unet = tiny_unet("sdxl", cross_attention_dim=32 + 48)
    pipe.register_modules(text_encoder_2=pipe.text_encoder_2, unet=pipe.unet)
    return pipe


def _assert_same_weights(a, b):
    for comp in COMPONENTS:
        ma = getattr(a, comp, None)
        if ma is None:
            continue
        sa, sb = ma.state_dict(), getattr(b, comp).state_dict()
        assert set(sa) == set(sb), comp
        for k in sa:
            assert torch.equal(sa[k].float(), sb[k].float()), f"{comp}.{k}"


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_from_single_file_loads_the_same_weights(arch, sd1_pipe, sdxl_pipe, tmp_path):
    pipe = sd1_pipe if arch == "sd1" else _distinct_sdxl(sdxl_pipe)
    save_pipeline(pipe, tmp_path / "pipe")
    path = save_single_file(pipe, tmp_path / "model.safetensors")
    sd = pipeline_to_ldm(pipe)
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in sd)
    assert any(k.startswith("first_stage_model.encoder.down.0.block.0.") for k in sd)
    if arch == "sdxl":
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in sd
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in sd
    else:
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in sd
    cls = StableDiffusionPipeline if arch == "sd1" else StableDiffusionXLPipeline
    back = cls.from_single_file(str(path), config=str(tmp_path / "pipe"), local_files_only=True)
    _assert_same_weights(pipe, back)


def test_fuse_writes_a_single_file(sd1_pipe, tmp_path):
    save_pipeline(sd1_pipe, tmp_path / "base")
    files = []
    for seed in (0, 1):
        files.append(str(save_adapter(random_adapter(sd1_pipe, rank=2, seed=seed), tmp_path / f"a{seed}.safetensors")))
    common = ["fuse", "--method", "weighted", "--adapters", *files, "--base", str(tmp_path / "base"), "--quiet"]
    assert main(common + ["--out", str(tmp_path / "fused"), "--out-format", "pipeline"]) == 0
    assert main(common + ["--out", str(tmp_path / "fused.safetensors"), "--out-format", "single-file"]) == 0
    assert (tmp_path / "fused.fusion.json").exists()
    want = StableDiffusionPipeline.from_pretrained(tmp_path / "fused")
    got = StableDiffusionPipeline.from_single_file(str(tmp_path / "fused.safetensors"), config=str(tmp_path / "base"),
                                                   local_files_only=True)
    _assert_same_weights(want, got)
    assert main(common + ["--out", str(tmp_path / "fused.ckpt"), "--out-format", "single-file"]) == 2


def test_added_tokens_are_refused(sd1_pipe, tmp_path):
    pipe = copy.deepcopy(sd1_pipe)
    pipe.tokenizer.add_tokens(["<c1>", "<c1>@1"])
    with pytest.raises(ValueError, match="added tokens"):
        save_single_file(pipe, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
