import copy

import pytest
import torch
from diffusers.utils import convert_state_dict_to_kohya
from peft import get_peft_model_state_dict

from lorakit.adapters.io import (
    AdapterError,
    apply_adapter,
    from_peft,
    load_adapter,
    module_path_from_kohya,
    save_adapter,
)
from lorakit.blocks import lora_able_modules, lora_config, module_ranks, resolve_block_spec
from lorakit.testing import random_adapter, unet_inputs


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_load_equals_lorakit_peft(arch, sd1_pipe, sdxl_pipe, tmp_path):
    pipe = sd1_pipe if arch == "sd1" else sdxl_pipe
    adapter = random_adapter(pipe, network="locon", rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0, text_encoder=True)
    assert any(m.is_conv and m.down.shape[-1] == 3 for m in adapter.modules.values())
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    inputs = unet_inputs(pipe)
    with torch.no_grad():
        base = pipe.unet(**inputs).sample
    theirs = copy.deepcopy(pipe)
    theirs.load_lora_weights(str(path), adapter_name="x")
    ours = copy.deepcopy(pipe)
    apply_adapter(ours, load_adapter(path))
    with torch.no_grad():
        out_theirs, out_ours = theirs.unet(**inputs).sample, ours.unet(**inputs).sample
    assert (out_theirs - base).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=0)
    ids = pipe.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        for comp in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, comp, None) is None:
                continue
            a, b = getattr(theirs, comp)(ids)[0], getattr(ours, comp)(ids)[0]
            assert (a - getattr(pipe, comp)(ids)[0]).abs().max() > 1e-3
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_merged_reference_equals_peft(sd1_pipe):
    """Adding delta = alpha/r * up @ down to the weights gives the same UNet output as peft."""
    adapter = random_adapter(sd1_pipe, network="locon", alpha=3.0, conv_rank=2, conv_alpha=1.0)
    merged = copy.deepcopy(sd1_pipe)
    for key, mod in adapter.modules.items():
        layer = merged.unet.get_submodule(key.split(".", 1)[1])
        layer.weight.data += mod.delta().reshape(layer.weight.shape)
    peft_pipe = copy.deepcopy(sd1_pipe)
    apply_adapter(peft_pipe, adapter)
    inputs = unet_inputs(sd1_pipe)
    with torch.no_grad():
        torch.testing.assert_close(peft_pipe.unet(**inputs).sample, merged.unet(**inputs).sample, atol=1e-5, rtol=0)


def test_peft_file_peft_roundtrip_exact(sd1_pipe, tmp_path):
    from peft import inject_adapter_in_model

    unet = copy.deepcopy(sd1_pipe.unet)
    ranks = module_ranks(lora_able_modules(unet), resolve_block_spec("upper", "sd1", 4), "locon", 4, 8.0, 2, 1.0)
    inject_adapter_in_model(lora_config(ranks, init="gaussian"), unet)
    for n, p in unet.named_parameters():
        if "lora_B" in n:
            p.data.normal_()
    from lorakit.adapters.io import Adapter, adapter_metadata

    original = from_peft(unet, "unet")
    save_adapter(Adapter(original, adapter_metadata("sd1", "locon")), tmp_path / "p.safetensors")
    back = load_adapter(tmp_path / "p.safetensors")
    assert set(back.modules) == set(original)
    for k, m in original.items():
        assert torch.equal(back.modules[k].down, m.down) and torch.equal(back.modules[k].up, m.up)
        assert back.modules[k].alpha == m.alpha
    unet2 = copy.deepcopy(sd1_pipe.unet)
    holder = copy.copy(sd1_pipe)
    holder.unet = unet2
    apply_adapter(holder, back)
    again = from_peft(unet2, "unet")
    assert all(torch.equal(again[k].down, original[k].down) and again[k].alpha == original[k].alpha for k in original)


def test_reads_diffusers_kohya_converter_output(sd1_pipe, tmp_path):
    """A file made by diffusers' own PEFT->kohya converter reads back exactly (alpha = rank there)."""
    from peft import inject_adapter_in_model
    from safetensors.torch import save_file

    unet = copy.deepcopy(sd1_pipe.unet)
    ranks = module_ranks(lora_able_modules(unet), resolve_block_spec("all", "sd1", 4), "lora", 4, 4.0)
    inject_adapter_in_model(lora_config(ranks, init="gaussian"), unet)
    for n, p in unet.named_parameters():
        if "lora_B" in n:
            p.data.normal_()
    peft_sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    kohya = convert_state_dict_to_kohya(peft_sd)
    save_file({k: v.contiguous() for k, v in kohya.items()}, tmp_path / "k.safetensors")
    back = load_adapter(tmp_path / "k.safetensors")
    original = from_peft(unet, "unet")
    assert set(back.modules) == set(original)
    for k, m in original.items():
        assert torch.equal(back.modules[k].down, m.down) and torch.equal(back.modules[k].up, m.up)
        assert back.modules[k].alpha == m.alpha


def test_reads_peft_format_file(sd1_pipe, tmp_path):
    from safetensors.torch import save_file

    adapter = random_adapter(sd1_pipe, blocks="middle")
    sd = {}
    for k, m in adapter.modules.items():
        sd[f"{k}.lora_A.weight"], sd[f"{k}.lora_B.weight"] = m.down, m.up
    save_file(sd, tmp_path / "peft.safetensors")
    back = load_adapter(tmp_path / "peft.safetensors")
    assert set(back.modules) == set(adapter.modules)
    assert all(torch.equal(back.modules[k].up, m.up) for k, m in adapter.modules.items())


def test_kohya_name_parsing():
    assert module_path_from_kohya("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0") == (
        "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0"
    )
    assert module_path_from_kohya("lora_unet_down_blocks_0_resnets_1_time_emb_proj") == (
        "unet.down_blocks.0.resnets.1.time_emb_proj"
    )
    assert module_path_from_kohya("lora_te2_text_model_encoder_layers_11_self_attn_q_proj") == (
        "text_encoder_2.text_model.encoder.layers.11.self_attn.q_proj"
    )
    assert module_path_from_kohya("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj") == (
        "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"
    )


def test_sdxl_adapter_on_sd1_base_is_refused(sd1_pipe, sdxl_pipe, tmp_path):
    path = save_adapter(random_adapter(sdxl_pipe), tmp_path / "xl.safetensors")
    with pytest.raises(AdapterError, match="adapter is for sdxl but the base model is sd1"):
        apply_adapter(copy.deepcopy(sd1_pipe), load_adapter(path))


def test_shape_mismatch_lists_offenders(sd1_pipe):
    from lorakit.adapters.io import validate_adapter

    adapter = random_adapter(sd1_pipe, blocks="upper")
    adapter.metadata.pop("lorakit.base_arch")
    key = next(iter(adapter.modules))
    adapter.modules[key].down = adapter.modules[key].down[:, :3]
    adapter.modules["unet.down_blocks.0.attentions.0.nonexistent"] = adapter.modules[key]
    with pytest.raises(AdapterError, match=r"2 problem\(s\).*" ):
        validate_adapter(adapter, sd1_pipe)


def test_truncated_file_is_reported(sd1_pipe, tmp_path):
    path = save_adapter(random_adapter(sd1_pipe, blocks="upper"), tmp_path / "t.safetensors")
    data = path.read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"trunc\.safetensors: not a readable \.safetensors file"):
        load_adapter(bad)


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import safetensors.torch

    from lorakit.fileio import save_safetensors

    def boom(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(RuntimeError):
        save_safetensors({"a": torch.zeros(1)}, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_get_normal_permissions(tmp_path):
    """Files written through the temp-file + rename path get open()'s permissions, not mkstemp's 0600."""
    import os

    from lorakit.fileio import _UMASK, write_text

    path = write_text("x", tmp_path / "a.txt")
    assert (os.stat(path).st_mode & 0o777) == (0o666 & ~_UMASK)
