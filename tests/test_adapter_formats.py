"""Reading shared files: every format loads to the delta its own tool applies.

References: diffusers' ``load_lora_weights`` + ``fuse_lora`` (kohya SAI names, peft files with alpha metadata),
diffusers' LDM UNet converter (SAI names), peft's LoHa / LoKr layers (``get_delta_weight``), formulas written
out here (LyCORIS files).
"""

import copy
import json

import re

import pytest
import torch
from safetensors.torch import save_file

from lorakit.adapters.io import AdapterError, load_adapter, save_adapter, validate_adapter
from lorakit.adapters.keys import sai_unet_path
from lorakit.adapters.loha import LohaModule
from lorakit.adapters.lokr import LokrModule
from lorakit.testing import random_adapter


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def diffusers_deltas(pipe, path, comps=("unet", "text_encoder", "text_encoder_2")) -> dict[str, torch.Tensor]:
    """``{component.path: fused weight - base weight}`` after diffusers' load_lora_weights + fuse_lora."""
    theirs = copy.deepcopy(pipe)
    theirs.load_lora_weights(str(path), adapter_name="x")
    present = [c for c in comps if getattr(pipe, c, None) is not None]
    theirs.fuse_lora(components=present, lora_scale=1.0)
    out = {}
    for comp in present:
        base_layers = _layers(getattr(pipe, comp))
        for name, mod in getattr(theirs, comp).named_modules():
            if hasattr(mod, "base_layer") and name in base_layers:
                d = mod.base_layer.weight.detach() - base_layers[name].weight.detach()
                if d.abs().max() > 0:
                    out[f"{comp}.{name}"] = d
    return out


def assert_same_deltas(ours, theirs, pipe):
    """Our adapter's deltas equal diffusers' on every touched layer (relative 1e-5 of the largest entry)."""
    from lorakit.adapters.io import live_path

    assert theirs, "diffusers applied nothing"
    assert set(theirs) == {k.split(".", 1)[0] + "." + live_path(getattr(pipe, k.split(".", 1)[0]), k.split(".", 1)[1])
                           for k in ours.modules}
    for key, mod in ours.modules.items():
        comp, path = key.split(".", 1)
        want = theirs[f"{comp}.{live_path(getattr(pipe, comp), path)}"]
        got = mod.delta().reshape(want.shape)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


# --------------------------------------------------------------------------------------- kohya SAI / LDM names


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_sai_names_invert_diffusers_ldm_unet_converter(arch, sd1_pipe, sdxl_pipe):
    """Every UNet parameter renamed to SAI/LDM names by lorakit converts back to itself with diffusers' own
    single-file converter (an independent table from the LoRA converter the reader uses)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = (sd1_pipe if arch == "sd1" else sdxl_pipe).unet
    sd = unet.state_dict()
    ldm = {}
    for key, value in sd.items():
        module, param = key.rsplit(".", 1)
        ldm[f"model.diffusion_model.{sai_unet_path(module, arch)}.{param}"] = value
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(sd)
    for key in sd:
        assert torch.equal(back[key], sd[key]), key


def test_kohya_sdxl_sai_file_reads_like_diffusers(sdxl_pipe, tmp_path):
    adapter = random_adapter(sdxl_pipe, network="locon", rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0,
                             text_encoder=True)
    path = save_adapter(adapter, tmp_path / "sai.safetensors", key_style="sai")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in keys)
    assert any(k.startswith("lora_unet_output_blocks_2_2_conv.") for k in keys)  # the upsampler A1111 needs
    assert not any("down_blocks" in k or "up_blocks" in k for k in keys)
    ours = load_adapter(path)
    assert set(ours.modules) == set(adapter.modules)
    validate_adapter(ours, sdxl_pipe, path)
    assert_same_deltas(ours, diffusers_deltas(sdxl_pipe, path), sdxl_pipe)


def test_one_key_sai_file_fits_tiny_sdxl(sdxl_pipe, tmp_path):
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    layer = sdxl_pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    save_file({f"{name}.lora_down.weight": torch.randn(2, layer.in_features, generator=g),
               f"{name}.lora_up.weight": torch.randn(layer.out_features, 2, generator=g),
               f"{name}.alpha": torch.tensor(1.0)}, str(tmp_path / "one.safetensors"))
    ad = load_adapter(tmp_path / "one.safetensors")
    assert list(ad.modules) == ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    validate_adapter(ad, sdxl_pipe)


# ------------------------------------------------------------------------------- peft / diffusers with metadata


def test_diffusers_file_with_lora_alpha_metadata(sd1_pipe, tmp_path):
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = copy.deepcopy(sd1_pipe)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                     alpha_pattern={"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 2})
    pipe.unet.add_adapter(cfg)
    g = torch.Generator().manual_seed(1)
    for n, p in pipe.unet.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    type(pipe).save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                 unet_lora_adapter_metadata=cfg.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    ours = load_adapter(path)
    alphas = {k: m.alpha for k, m in ours.modules.items()}
    assert alphas["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == 2.0
    assert alphas["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"] == 8.0
    assert_same_deltas(ours, diffusers_deltas(sd1_pipe, path), sd1_pipe)


def test_diffusers_text_encoder_file_names_layers_like_kohya(sd1_pipe, tmp_path):
    """diffusers' own save_lora_weights under transformers 5 writes ``text_encoder.encoder.layers...`` (no
    ``text_model.``): lorakit names those layers as it names a kohya file's, and applies diffusers' delta."""
    from peft import LoraConfig, get_peft_model_state_dict

    from lorakit.adapters.keys import module_path_from_kohya

    pipe = copy.deepcopy(sd1_pipe)
    pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                             target_modules=["q_proj", "out_proj", "fc1"]))
    type(pipe).save_lora_weights(tmp_path, text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder))
    path = tmp_path / "pytorch_lora_weights.safetensors"
    ours = load_adapter(path)
    kohya = module_path_from_kohya("lora_te_text_model_encoder_layers_0_self_attn_q_proj")
    assert kohya in ours.modules and len(ours.modules) == 6
    assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in ours.modules)
    assert_same_deltas(ours, diffusers_deltas(sd1_pipe, path), sd1_pipe)


def test_peft_adapter_config_beside_the_file(tmp_path):
    g = torch.Generator().manual_seed(2)
    save_file({"base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(4, 8, generator=g),
               "base_model.model.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(8, 4, generator=g)},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 16, "use_rslora": True}))
    mod = load_adapter(tmp_path / "adapter_model.safetensors").modules["unet.down_blocks.0.attentions.0.proj_in"]
    assert mod.scale == pytest.approx(16 / 4 ** 0.5)  # rsLoRA: alpha / sqrt(r)


# ------------------------------------------------------------------------------------------- LyCORIS LoHa / LoKr


def _sd1_layers(pipe):
    unet = pipe.unet
    return {"lin": ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
                    unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight),
            "conv": ("lora_unet_down_blocks_1_resnets_0_conv1", unet.down_blocks[1].resnets[0].conv1.weight),
            "te": ("lora_te_text_model_encoder_layers_0_mlp_fc1",
                   pipe.text_encoder.get_submodule("text_model.encoder.layers.0.mlp.fc1"
                                                   if hasattr(pipe.text_encoder, "text_model")
                                                   else "encoder.layers.0.mlp.fc1").weight)}


def test_lycoris_loha_file(sd1_pipe, tmp_path):
    g = torch.Generator().manual_seed(3)
    r, alpha = 4, 2.0
    tensors, want = {}, {}
    for name, w in _sd1_layers(sd1_pipe).values():
        out, flat = w.shape[0], w[0].numel()
        w1a, w1b, w2a, w2b = (torch.randn(out, r, generator=g), torch.randn(r, flat, generator=g),
                              torch.randn(out, r, generator=g), torch.randn(r, flat, generator=g))
        tensors.update({f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b, f"{name}.hada_w2_a": w2a,
                        f"{name}.hada_w2_b": w2b, f"{name}.alpha": torch.tensor(alpha)})
        want[name] = ((w1a @ w1b) * (w2a @ w2b) * alpha / r).reshape(w.shape)
    save_file(tensors, str(tmp_path / "loha.safetensors"))
    ad = load_adapter(tmp_path / "loha.safetensors")
    assert ad.kind == "loha" and len(ad.modules) == 3
    validate_adapter(ad, sd1_pipe)
    from lorakit.adapters.keys import module_path_from_kohya

    for name, d in want.items():
        got = ad.modules[module_path_from_kohya(name)].delta()
        assert got.shape == d.shape
        torch.testing.assert_close(got, d, rtol=0, atol=1e-5 * float(d.abs().max()))


def test_lycoris_lokr_file_factorised_and_whole(sd1_pipe, tmp_path):
    g = torch.Generator().manual_seed(4)
    name_l, w_l = _sd1_layers(sd1_pipe)["lin"]  # [32, 32]
    name_c, w_c = _sd1_layers(sd1_pipe)["conv"]  # [32, 32, 3, 3]
    w1 = torch.randn(4, 4, generator=g)
    w2a, w2b = torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g)
    w2c = torch.randn(8, 8, 3, 3, generator=g)
    save_file({f"{name_l}.lokr_w1": w1, f"{name_l}.lokr_w2_a": w2a, f"{name_l}.lokr_w2_b": w2b,
               f"{name_l}.alpha": torch.tensor(1.0),
               f"{name_c}.lokr_w1": w1.clone(), f"{name_c}.lokr_w2": w2c, f"{name_c}.alpha": torch.tensor(5.0)},
              str(tmp_path / "lokr.safetensors"))
    ad = load_adapter(tmp_path / "lokr.safetensors")
    assert ad.kind == "lokr"
    validate_adapter(ad, sd1_pipe)
    from lorakit.adapters.keys import module_path_from_kohya

    lin = ad.modules[module_path_from_kohya(name_l)].delta()
    torch.testing.assert_close(lin, torch.kron(w1, w2a @ w2b) * 0.5, rtol=0, atol=1e-5)
    conv = ad.modules[module_path_from_kohya(name_c)].delta()
    assert conv.shape == w_c.shape
    want = torch.einsum("ij,pqkl->ipjqkl", w1, w2c).reshape(32, 32, 3, 3)  # whole factors: alpha not applied
    torch.testing.assert_close(conv, want, rtol=0, atol=1e-5)


def test_lycoris_prefix_names_a_diffusers_unet_layer(tmp_path):
    g = torch.Generator().manual_seed(8)
    name = "lycoris_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lokr_w1": torch.randn(2, 2, generator=g), f"{name}.lokr_w2": torch.randn(16, 16, generator=g)},
              str(tmp_path / "st.safetensors"))
    ad = load_adapter(tmp_path / "st.safetensors")
    assert list(ad.modules) == ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]


@pytest.mark.parametrize("effective_conv", [False, True])
def test_loha_matches_peft_loha_layer(effective_conv):
    from peft import LoHaConfig, inject_adapter_in_model

    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Conv2d(3, 4, 3))
    inject_adapter_in_model(LoHaConfig(r=2, alpha=3.0, target_modules=["0", "1"], init_weights=False,
                                       use_effective_conv2d=effective_conv), model)
    for idx in ("0", "1"):
        layer = model.get_submodule(idx)
        parts = {f"hada_{p}": getattr(layer, f"hada_{p}")["default"].detach()
                 for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2") if "default" in getattr(layer, f"hada_{p}")}
        parts["alpha"] = torch.tensor(3.0)
        ours = LohaModule.from_parts(parts, kernel=(3, 3) if idx == "1" else None).delta()
        theirs = layer.get_delta_weight("default").detach()
        torch.testing.assert_close(ours.reshape(theirs.shape), theirs, rtol=0, atol=1e-5)


def test_lokr_matches_peft_lokr_layer():
    from peft import LoKrConfig, inject_adapter_in_model

    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Conv2d(8, 8, 3))
    inject_adapter_in_model(LoKrConfig(r=2, alpha=3.0, target_modules=["0", "1"], init_weights=False,
                                       decompose_both=True), model)
    for idx in ("0", "1"):
        layer = model.get_submodule(idx)
        parts = {f"lokr_{p}": getattr(layer, f"lokr_{p}")["default"].detach()
                 for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2") if "default" in getattr(layer, f"lokr_{p}")}
        parts["alpha"] = torch.tensor(3.0)
        mod = LokrModule.from_parts(parts, kernel=(3, 3) if idx == "1" else None)
        theirs = layer.get_delta_weight("default").detach()
        if mod.rank == 0:  # peft scales whole factors by alpha / r too; LyCORIS does not
            theirs = theirs / layer.scaling["default"]
        torch.testing.assert_close(mod.delta().reshape(theirs.shape), theirs, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------- errors


def test_unsupported_kind_and_unplaced_key_are_named(tmp_path):
    save_file({"lora_unet_x.oft_blocks": torch.zeros(1, 2, 2)}, str(tmp_path / "oft.safetensors"))
    with pytest.raises(AdapterError, match="OFT adapters are not supported"):
        load_adapter(tmp_path / "oft.safetensors")
    save_file({"lora_unet_input_blocks_99_7_foo.lora_down.weight": torch.zeros(1, 2),
               "lora_unet_input_blocks_99_7_foo.lora_up.weight": torch.zeros(2, 1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(AdapterError, match=r"lora_unet_input_blocks_99_7_foo.*SAI/LDM names"):
        load_adapter(tmp_path / "bad.safetensors")
    save_file({"lora_unet_x.lora_foo.weight": torch.zeros(1, 2)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(AdapterError, match=r"cannot place key 'lora_unet_x.lora_foo.weight' \(format guessed: kohya"):
        load_adapter(tmp_path / "odd.safetensors")


@pytest.mark.parametrize("tensors, kind", [
    ({"lora_unet_x.oft_blocks": torch.zeros(4, 2, 2), "lora_unet_x.alpha": torch.tensor(1.0)}, "OFT"),
    ({"lora_unet_x.oft_blocks": torch.zeros(2, 4, 2, 2), "lora_unet_x.rescale": torch.ones(8, 1)}, "BOFT"),
    ({"unet.x.boft_R.weight": torch.zeros(2, 4, 2, 2), "unet.x.boft_s.weight": torch.ones(8, 1)}, "BOFT"),
])
def test_oft_and_boft_files_are_refused_by_kind(tensors, kind, tmp_path, capsys):
    """LyCORIS writes OFT and BOFT under one name (``oft_blocks``; BOFT's has 4 dimensions): each is refused
    with its own kind and the key, by the reader and by ``lorakit inspect`` (one line, exit 2)."""
    from lorakit.cli import main

    path = tmp_path / f"{kind}.safetensors"
    save_file(tensors, str(path))
    first = next(k for k in tensors if "oft" in k)
    with pytest.raises(AdapterError, match=rf"{kind} adapters are not supported \(key '{re.escape(first)}'\)"):
        load_adapter(path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{kind} adapters are not supported" in err and "Traceback" not in err


def test_loha_file_samples_like_merged_weights(sd1_pipe, tmp_path, capsys):
    """``sample``'s loader puts a LoHa file in through peft (exact LoRA form): same UNet output as adding the
    delta to the weights; ``inspect`` reports it."""
    from lorakit.cli import main
    from lorakit.sampling.loading import load_adapters
    from lorakit.testing import unet_inputs

    g = torch.Generator().manual_seed(7)
    name, w = _sd1_layers(sd1_pipe)["conv"]
    path = tmp_path / "loha.safetensors"
    save_file({f"{name}.hada_w1_a": torch.randn(32, 2, generator=g), f"{name}.hada_w1_b": torch.randn(2, 288, generator=g),
               f"{name}.hada_w2_a": torch.randn(32, 2, generator=g), f"{name}.hada_w2_b": torch.randn(2, 288, generator=g),
               f"{name}.alpha": torch.tensor(1.0)}, str(path))
    delta = load_adapter(path).modules["unet.down_blocks.1.resnets.0.conv1"].delta()
    merged = copy.deepcopy(sd1_pipe)
    merged.unet.down_blocks[1].resnets[0].conv1.weight.data += delta
    pipe = copy.deepcopy(sd1_pipe)
    load_adapters(pipe, [path])
    inputs = unet_inputs(sd1_pipe)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(**inputs).sample, merged.unet(**inputs).sample, rtol=0, atol=1e-5)
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "loha" and report["layer_types"] == ["loha"] and "LoHa" in report["format"] and report["parameters"] == 2 * (64 + 576)


@pytest.mark.slow
def test_full_size_sdxl_sai_names_round_trip():
    """Every attention / resnet / sampler layer of a real-size SDXL UNet (transformer depth 1, 2, 10; meta device):
    lorakit's SAI name, read back through diffusers' converter, is the same layer."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from lorakit.adapters.keys import sai_names_to_module_keys

    with init_empty_weights():
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    paths = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
             and any(w in n for w in (".attentions.", ".resnets.", "samplers."))]
    names = {"lora_unet_" + sai_unet_path(p, "sdxl").replace(".", "_"): p for p in paths}
    assert len(names) == len(paths) == 788
    back = sai_names_to_module_keys(list(names))
    assert all(back[n] == "unet." + p for n, p in names.items())
