import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from lorakit.cli import main
from lorakit.models import detect_arch, load_base, tiny_pipeline, tiny_tokenizer


def test_tiny_layouts(sd1_pipe, sdxl_pipe):
    u1, u2 = sd1_pipe.unet, sdxl_pipe.unet
    assert len(u1.down_blocks) == 4 and sum(hasattr(b, "attentions") for b in u1.down_blocks) == 3
    assert len(u2.down_blocks) == 3 and not hasattr(u2.down_blocks[0], "attentions")
    assert u2.config.addition_embed_type == "text_time"
    assert sdxl_pipe.text_encoder_2 is not None
    assert detect_arch(u1.config) == "sd1" and detect_arch(u2.config) == "sdxl"


def test_detect_arch_rejects_other_unets():
    import pytest

    with pytest.raises(ValueError, match="unsupported UNet"):
        detect_arch({"down_block_types": ["DownBlock2D"] * 2})


def test_tiny_is_seeded():
    a, b = tiny_pipeline("sd1", seed=3), tiny_pipeline("sd1", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.unet.parameters(), b.unet.parameters()))


def test_tokenizer_words_are_single_tokens():
    tok = tiny_tokenizer()
    ids = tok("a photo of a red cat").input_ids
    assert len(ids) == 2 + 6
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a red cat"


def test_make_tiny_loads_in_diffusers(tmp_path):
    for arch, cls in (("sd1", StableDiffusionPipeline), ("sdxl", StableDiffusionXLPipeline)):
        out = tmp_path / arch
        assert main(["make-tiny", "--arch", arch, "--out", str(out)]) == 0
        pipe = cls.from_pretrained(out)
        ref = tiny_pipeline(arch)
        assert all(torch.equal(x, y) for x, y in zip(pipe.unet.parameters(), ref.unet.parameters()))
        img = pipe("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np").images
        assert img.shape == (1, 32, 32, 3)
        assert detect_arch(load_base(out).unet.config) == arch


def test_load_base_errors_name_the_input(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_base(tmp_path)
    with pytest.raises(ValueError, match="pickle"):
        load_base(tmp_path / "x.ckpt")


def test_tiny_base_name():
    pipe = load_base("tiny:sdxl:2")
    ref = tiny_pipeline("sdxl", seed=2)
    assert all(torch.equal(x, y) for x, y in zip(pipe.unet.parameters(), ref.unet.parameters()))
