import pytest

from lorakit.blocks import (
    COARSE,
    fine_blocks,
    lora_able_modules,
    lora_config,
    module_ranks,
    resolve_block_spec,
    select_target_modules,
)


def _selected(pipe, spec, network="locon", arch=None):
    arch = arch or ("sdxl" if pipe.unet.config.addition_embed_type else "sd1")
    mods = lora_able_modules(pipe.unet)
    return module_ranks(mods, resolve_block_spec(spec, arch, 4), network, rank=4, alpha=4)


def test_upper_preset_sd1_touches_only_outer_blocks(sd1_pipe):
    sel = _selected(sd1_pipe, "upper")
    assert sel and all(n.startswith(("down_blocks.0.", "up_blocks.3.")) for n in sel)
    assert any(n.startswith("down_blocks.0.") for n in sel) and any(n.startswith("up_blocks.3.") for n in sel)


def test_presets_sdxl(sdxl_pipe):
    sel = _selected(sdxl_pipe, "middle")
    assert sel and all(n.startswith(("down_blocks.1.", "up_blocks.1.")) for n in sel)
    assert _selected(sdxl_pipe, "style") == _selected(sdxl_pipe, "upper")
    assert _selected(sdxl_pipe, "character") == _selected(sdxl_pipe, "all")


def test_every_module_in_exactly_one_block(sd1_pipe, sdxl_pipe):
    for pipe, arch in ((sd1_pipe, "sd1"), (sdxl_pipe, "sdxl")):
        mods = lora_able_modules(pipe.unet)
        union = []
        for block in COARSE[arch]:
            union += list(module_ranks(mods, resolve_block_spec({block: 4}, arch, 4), "locon"))
        assert sorted(union) == sorted(mods)  # each module once, none missing
        assert set(module_ranks(mods, resolve_block_spec("all", arch, 4), "locon")) == set(mods)
        # every transformer / resnet / sampler Linear or Conv is covered
        import torch

        expected = {
            n
            for n, m in pipe.unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and any(s in n for s in (".attentions.", ".resnets.", "samplers."))
        }
        assert set(mods) == expected


def test_kohya_vector_zeros_skip_blocks(sd1_pipe):
    fines = fine_blocks("sd1")
    assert len(fines) == 25
    vec = [4] * 25
    for zero in ("IN04", "IN05", "IN06", "MID", "OUT11"):
        vec[fines.index(zero)] = 0
    sel = _selected(sd1_pipe, ",".join(map(str, vec)))
    assert not any(n.startswith(("down_blocks.1.", "mid_block.")) for n in sel)
    assert not any(n.startswith("up_blocks.3.") and n.split(".")[3] == "2" for n in sel)  # OUT11 = up3 layer 2
    assert any(n.startswith("up_blocks.3.resnets.1") for n in sel)
    # fine block ranks are applied
    vec2 = [0] * 25
    vec2[fines.index("IN07")] = 8
    sel2 = _selected(sd1_pipe, vec2, network="lora")
    assert sel2 and all(n.startswith("down_blocks.2.attentions.0.") for n in sel2)
    assert {r for r, _ in sel2.values()} == {8}


def test_lbw_vector(sd1_pipe, sdxl_pipe):
    lbw = [1] + [0] * 6 + [0] + [0] * 9  # only BASE
    assert _selected(sd1_pipe, lbw, "lora") == {}
    lbw = [0, 1, 1] + [0] * 4 + [0.5] + [0] * 9  # IN01, IN02 and MID at half weight
    sel = _selected(sd1_pipe, lbw, "lora")
    assert {n.split(".")[0] + (n.split(".")[1] if n[0] == "d" else "") for n in sel} == {"down_blocks0", "mid_block"}
    assert all(a == 2.0 for n, (r, a) in sel.items() if n.startswith("mid_block"))
    sel_xl = _selected(sdxl_pipe, [0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], "lora")
    assert sel_xl and all(n.startswith("down_blocks.1.attentions.") for n in sel_xl)


def test_lora_vs_locon_families(sd1_pipe):
    lora = _selected(sd1_pipe, "all", "lora")
    locon = _selected(sd1_pipe, "all", "locon")
    assert all(".attentions." in n for n in lora)
    assert any(n.endswith("resnets.0.conv1") for n in locon) and set(lora) < set(locon)


def test_peft_config_applies_exact_ranks(sd1_pipe):
    import copy

    from peft import inject_adapter_in_model

    ranks = module_ranks(
        lora_able_modules(sd1_pipe.unet), resolve_block_spec({"IN0": 8, "OUT3": 2}, "sd1", 4), "locon", 4, 4, 2, 1
    )
    unet = inject_adapter_in_model(lora_config(ranks), copy.deepcopy(sd1_pipe.unet))
    from peft.tuners.lora import LoraLayer

    got = {n: (m.r["default"], m.lora_alpha["default"]) for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    assert got == {n: (r, a) for n, (r, a) in ranks.items()}
    # conv rank/alpha scale with the block rank: IN0 asks 8 = 2x the network rank 4 -> conv 2 * 2 = 4, alpha 2
    assert got["down_blocks.0.resnets.0.conv1"] == (4, 2.0)
    assert got["up_blocks.3.resnets.0.conv1"] == (1, 0.5)
    assert got["up_blocks.3.attentions.0.proj_in"] == (2, 2.0)


def test_bad_specs_name_the_problem():
    with pytest.raises(ValueError, match="did you mean 'upper'"):
        resolve_block_spec("uper", "sd1", 4)
    with pytest.raises(ValueError, match="expected 25 .* or 17"):
        resolve_block_spec([1, 2, 3], "sd1", 4)
    with pytest.raises(ValueError, match="unknown block 'IN3'"):
        resolve_block_spec({"IN3": 4}, "sdxl", 4)


def test_sdxl_23_value_block_lr_layout(sdxl_pipe):
    """kohya sdxl_train's 23-value layout (embed, IN00-08, MID00-02, OUT00-08, out) equals the 19-value vector."""
    fines = fine_blocks("sdxl")
    v19 = [(i % 3) * 4 for i in range(19)]  # 0, 4, 8, ... with zeros skipping blocks
    mid = v19[fines.index("MID")]
    v23 = [7] + v19[:9] + [mid, mid, mid] + v19[10:] + [7]
    assert resolve_block_spec(v23, "sdxl", 4) == resolve_block_spec(v19, "sdxl", 4)
    assert _selected(sdxl_pipe, v23) == _selected(sdxl_pipe, v19)
    bad = list(v23)
    bad[11] = mid + 1
    with pytest.raises(ValueError, match="MID00-MID02"):
        resolve_block_spec(bad, "sdxl", 4)
    with pytest.raises(ValueError, match="23 \\(kohya sdxl block_lr layout\\)"):
        resolve_block_spec([1] * 5, "sdxl", 4)
    with pytest.raises(ValueError, match="expected 25"):
        resolve_block_spec([4] * 23, "sd1", 4)


def test_mapping_without_rank_is_named():
    from omegaconf import OmegaConf

    spec = OmegaConf.from_dotlist(["blocks={IN0:8,OUT3:8}"]).blocks  # YAML reads "IN0:8" as a key without value
    with pytest.raises(ValueError, match="block 'IN0:8': rank None is not a number"):
        resolve_block_spec(spec, "sd1", 4)
    assert resolve_block_spec({"IN0": "8"}, "sd1", 4)["IN01"] == (8, 1.0)


def test_target_modules_keep_only_matching_suffixes(sd1_pipe):
    lora = _selected(sd1_pipe, "all", "lora")
    kv = select_target_modules(lora, ["attn2.to_k", "attn2.to_v"])
    assert kv and all(n.endswith((".attn2.to_k", ".attn2.to_v")) for n in kv)
    assert {n for n in lora if n.endswith((".attn2.to_k", ".attn2.to_v"))} == set(kv)
    assert select_target_modules(lora, None) is lora
    with pytest.raises(ValueError, match=r"network.target_modules: attn3.to_k matches no module"):
        select_target_modules(lora, ["attn2.to_k", "attn3.to_k"])
    with pytest.raises(ValueError, match=r"network.target_modules: expected a list of module-name suffixes"):
        select_target_modules(lora, "attn2.to_k")
