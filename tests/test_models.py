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
        _text_encoders_in_both_key_layouts(out, pipe, ref)


def _text_encoders_in_both_key_layouts(out, pipe, ref):
    """Each text encoder file holds every weight under ``text_model.*`` (+ ``text_projection``): the layout
    transformers 4 loads, and transformers 5 loads it too (weights equal to the built model's)."""
    from safetensors import safe_open

    for name in ("text_encoder", "text_encoder_2"):
        built = getattr(ref, name, None)
        if built is None:
            continue
        with safe_open(str(out / name / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        v4_layout = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k
                     for k in built.state_dict()}
        assert keys == v4_layout, name
        loaded = getattr(pipe, name).state_dict()
        assert loaded.keys() == built.state_dict().keys()
        assert all(torch.equal(loaded[k], v) for k, v in built.state_dict().items()), name


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


def test_full_size_configs_match_released_parameter_counts():
    # Counted on the meta device: exact sizes, no memory. Reference counts: SD 1.5 / SDXL model cards.
    from lorakit.models import component_factories

    def count(arch):
        with torch.device("meta"):
            return {k: sum(p.numel() for p in f().parameters()) for k, f in component_factories(arch, "full").items()}

    sd1, sdxl = count("sd1"), count("sdxl")
    assert round(sd1["unet"] / 1e6) == 860 and round(sd1["vae"] / 1e6) == 84 and round(sd1["text_encoder"] / 1e6) == 123
    assert round(sdxl["unet"] / 1e6) == 2567 and round(sdxl["text_encoder_2"] / 1e6) == 695


def test_mid_and_config_folder_pipelines_generate(tmp_path):
    from lorakit.models import pipeline_from_configs, sized_pipeline

    mid = sized_pipeline("sd1", "mid", seed=1)
    assert list(mid.unet.config.block_out_channels) == [32, 64, 128, 128] and detect_arch(mid.unet.config) == "sd1"
    # --config: the configs of a saved pipeline give a pipeline of the same architecture and sizes.
    sdxl = sized_pipeline("sdxl", "mid")
    sdxl.save_config(tmp_path)  # model_index.json only; per-model configs below
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        getattr(sdxl, name).save_config(tmp_path / name) if name in ("unet", "vae") else \
            getattr(sdxl, name).config.to_json_file(str((tmp_path / name).mkdir() or tmp_path / name / "config.json"))
    rebuilt = pipeline_from_configs(tmp_path, seed=0)
    assert detect_arch(rebuilt.unet.config) == "sdxl"
    assert sum(p.numel() for p in rebuilt.unet.parameters()) == sum(p.numel() for p in sdxl.unet.parameters())
    img = rebuilt("a cat", num_inference_steps=1, height=64, width=64, output_type="np").images
    assert img.shape == (1, 64, 64, 3)


def test_make_tiny_size_and_random_base(tmp_path, capsys):
    import pytest

    out = tmp_path / "mid"
    assert main(["make-tiny", "--size", "mid", "--dtype", "bf16", "--out", str(out)]) == 0
    from safetensors import safe_open

    with safe_open(str(next((out / "unet").glob("*.safetensors"))), "pt") as f:
        assert f.get_tensor("conv_in.weight").dtype == torch.bfloat16
    assert list(StableDiffusionPipeline.from_pretrained(out).unet.config.block_out_channels) == [32, 64, 128, 128]
    assert list(load_base("random:sd1:mid:0").unet.config.block_out_channels) == [32, 64, 128, 128]
    with pytest.raises(ValueError, match="random:ARCH:SIZE"):
        load_base("random:sd1:huge")
    assert main(["make-tiny", "--config", str(tmp_path), "--out", str(tmp_path / "x")]) == 2  # names the config
    assert not (tmp_path / "x").exists() and "unet/config.json: missing" in capsys.readouterr().err
