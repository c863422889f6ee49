"""``lorakit convert``: every layout round-trips the deltas exactly, and diffusers reads what it writes."""

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorakit.adapters.io import load_adapter, save_adapter
from lorakit.cli import main
from lorakit.testing import random_adapter
from tests.test_adapter_formats import assert_same_deltas, diffusers_deltas


def _keys(path):
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def _same(a, b, atol=1e-6):
    assert set(a.modules) == set(b.modules)
    for k in a.modules:
        d = a.modules[k].delta()
        torch.testing.assert_close(b.modules[k].delta().reshape(d.shape), d, rtol=0,
                                   atol=atol * max(1.0, float(d.abs().max())))


def test_sdxl_key_styles_round_trip(sdxl_pipe, tmp_path):
    ad = random_adapter(sdxl_pipe, network="locon", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, text_encoder=True)
    src = save_adapter(ad, tmp_path / "a.safetensors", key_style="diffusers")
    assert any(k.startswith("lora_unet_up_blocks_0_upsamplers_0_conv.") for k in _keys(src))
    assert main(["convert", str(src), str(tmp_path / "sai.safetensors")]) == 0  # auto = sai for SDXL
    keys = _keys(tmp_path / "sai.safetensors")
    assert any(k.startswith("lora_unet_output_blocks_2_2_conv.") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert main(["convert", str(tmp_path / "sai.safetensors"), str(tmp_path / "d.safetensors"),
                 "--key-style", "diffusers"]) == 0
    assert sorted(_keys(tmp_path / "d.safetensors")) == sorted(_keys(src))
    _same(ad, load_adapter(tmp_path / "sai.safetensors"), atol=0)
    _same(ad, load_adapter(tmp_path / "d.safetensors"), atol=0)


def test_to_diffusers_keeps_every_layer_scale(sd1_pipe, tmp_path, capsys):
    ad = random_adapter(sd1_pipe, network="locon", rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0, text_encoder=True)
    te_key = next(k for k in ad.modules if k.startswith("text_encoder."))
    ad.modules[te_key].alpha = 5.0  # a text-encoder alpha_pattern entry too
    first = next(iter(ad.modules))
    ad.modules[first].alpha = 7.0  # one layer off the common alpha: goes to alpha_pattern
    src = save_adapter(ad, tmp_path / "a.safetensors")
    out = tmp_path / "diffusers.safetensors"
    assert main(["convert", str(src), str(out), "--to", "diffusers"]) == 0
    assert "ComfyUI skips its attention layers" in capsys.readouterr().out  # measured, docs/formats.md
    assert all(k.startswith(("unet.", "text_encoder.")) and ".lora_" in k for k in _keys(out))
    again = load_adapter(out)
    assert all(m.scale == 1.0 for m in again.modules.values())  # alpha / rank folded into lora_B
    _same(ad, again, atol=1e-6)
    assert_same_deltas(again, diffusers_deltas(sd1_pipe, out), sd1_pipe)


def test_loha_as_lora_for_diffusers(sd1_pipe, tmp_path):
    g = torch.Generator().manual_seed(0)
    w = sd1_pipe.unet.down_blocks[1].resnets[0].conv1.weight
    name = "lora_unet_down_blocks_1_resnets_0_conv1"
    save_file({f"{name}.hada_w1_a": torch.randn(32, 2, generator=g), f"{name}.hada_w1_b": torch.randn(2, 288, generator=g),
               f"{name}.hada_w2_a": torch.randn(32, 2, generator=g), f"{name}.hada_w2_b": torch.randn(2, 288, generator=g),
               f"{name}.alpha": torch.tensor(1.0)}, str(tmp_path / "loha.safetensors"))
    loha = load_adapter(tmp_path / "loha.safetensors")
    assert main(["convert", str(tmp_path / "loha.safetensors"), str(tmp_path / "x.safetensors"), "--to",
                 "diffusers"]) == 2  # LoHa layers need --as-lora for a diffusers file
    assert main(["convert", str(tmp_path / "loha.safetensors"), str(tmp_path / "k.safetensors")]) == 0
    _same(loha, load_adapter(tmp_path / "k.safetensors"), atol=0)  # LoHa stays LoHa in kohya / LyCORIS layout
    assert main(["convert", str(tmp_path / "loha.safetensors"), str(tmp_path / "d.safetensors"), "--to", "diffusers",
                 "--as-lora"]) == 0
    as_lora = load_adapter(tmp_path / "d.safetensors")
    assert as_lora.kind == "locon"
    _same(loha, as_lora, atol=1e-5)
    theirs = diffusers_deltas(sd1_pipe, tmp_path / "d.safetensors")
    d = loha.modules["unet.down_blocks.1.resnets.0.conv1"].delta()
    assert d.shape == w.shape
    torch.testing.assert_close(theirs["unet.down_blocks.1.resnets.0.conv1"], d, rtol=0,
                               atol=1e-5 * float(d.abs().max()))


def test_sai_for_sd1_is_refused(sd1_pipe, tmp_path, capsys):
    src = save_adapter(random_adapter(sd1_pipe), tmp_path / "a.safetensors")
    assert main(["convert", str(src), str(tmp_path / "b.safetensors"), "--key-style", "sai"]) == 2
    assert "--key-style sai is for SDXL" in capsys.readouterr().err
    assert main(["convert", str(src), str(src)]) == 2
    foreign = tmp_path / "theirs.safetensors"
    foreign.write_bytes(b"not ours")
    assert main(["convert", str(src), str(foreign), "--overwrite"]) == 2
    assert foreign.read_bytes() == b"not ours"
    assert main(["convert", str(src), str(tmp_path / "c.safetensors")]) == 0
    assert main(["convert", str(src), str(tmp_path / "c.safetensors")]) == 2  # exists: needs --overwrite
    assert main(["convert", str(src), str(tmp_path / "c.safetensors"), "--overwrite"]) == 0
