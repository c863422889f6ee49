"""Which consumer places which layer of lorakit's outputs (A1111 / ComfyUI / kohya name logic re-implemented in
lorakit.adapters.consumers; diffusers run for real)."""

import pytest

from lorakit.adapters.consumers import a1111_placement, comfyui_placement, kohya_placement

import check_consumers


def test_a1111_rewrite_misplaces_the_sdxl_upsampler_only_under_diffusers_names(sdxl_pipe):
    names = ["lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_up_blocks_1_upsamplers_0_conv",
             "lora_unet_output_blocks_2_2_conv", "lora_unet_down_blocks_1_attentions_0_proj_in",
             "lora_te2_text_model_encoder_layers_1_self_attn_q_proj", "lora_te1_text_model_encoder_layers_0_mlp_fc1"]
    placed = a1111_placement(names, sdxl_pipe, "sdxl")
    assert placed["lora_unet_up_blocks_0_upsamplers_0_conv"] is None
    assert placed["lora_unet_output_blocks_2_2_conv"] == "unet.up_blocks.0.upsamplers.0.conv"
    assert placed["lora_unet_up_blocks_1_upsamplers_0_conv"] == "unet.up_blocks.1.upsamplers.0.conv"
    assert placed["lora_unet_down_blocks_1_attentions_0_proj_in"] == "unet.down_blocks.1.attentions.0.proj_in"
    assert placed["lora_te2_text_model_encoder_layers_1_self_attn_q_proj"] == \
        "text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj"
    assert placed["lora_te1_text_model_encoder_layers_0_mlp_fc1"] == "text_encoder.text_model.encoder.layers.0.mlp.fc1"


def test_kohya_sdxl_network_has_sai_names_only(sdxl_pipe):
    """kohya's SDXL network is named in SAI names; kohya renames diffusers-named files first (as its
    create_network_from_weights does, checked by tools/check_consumers_real.py), LyCORIS's loader does not."""
    names = ["lora_unet_down_blocks_1_attentions_0_proj_in", "lora_unet_input_blocks_4_1_proj_in"]
    proj_in = "unet.down_blocks.1.attentions.0.proj_in"
    assert kohya_placement(names, sdxl_pipe, "sdxl") == dict.fromkeys(names, proj_in)
    assert kohya_placement(names, sdxl_pipe, "sdxl", rename_diffusers=False) == {names[0]: None, names[1]: proj_in}


def test_comfyui_reads_both_unet_namings_and_processor_style_diffusers_names(sd1_pipe):
    keys = ["lora_unet_input_blocks_1_1_proj_in.lora_up.weight", "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight"]
    placed = comfyui_placement(keys, sd1_pipe, "sd1")
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert placed == {"lora_unet_input_blocks_1_1_proj_in": "unet.down_blocks.0.attentions.0.proj_in",
                      "lora_unet_down_blocks_0_attentions_0_proj_in": "unet.down_blocks.0.attentions.0.proj_in",
                      "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": None,
                      "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q": q}


@pytest.mark.slow  # 8.1 s of CPU in the fast suite (2026-12-03, one thread, loaded machine)
def test_sdxl_outputs_table(tmp_path):
    """The SDXL rows of docs/formats.md: SAI-named files place every layer in every consumer but diffusers'
    LoHa / LoKr refusal; diffusers names lose one layer in A1111 (kohya renames them to SAI names itself)."""
    rows = {(r["output"], r["consumer"]): r for r in check_consumers.check("sdxl", tmp_path)}
    n = rows[("locon kohya (sai names)", "diffusers (run)")]["layers"]
    for consumer in ("A1111 (re-implemented)", "ComfyUI (re-implemented)", "kohya sd-scripts (re-implemented)",
                     "diffusers (run)"):
        assert rows[("locon kohya (sai names)", consumer)]["placed"] == n
    for kind in ("loha", "lokr"):
        assert rows[(f"{kind} kohya (sai names)", "LyCORIS in sd-scripts (re-implemented)")]["placed"] == n
        assert rows[(f"{kind} kohya (sai names)", "ComfyUI (re-implemented)")]["placed"] == n
        assert "refused" in rows[(f"{kind} kohya (sai names)", "diffusers (run)")]
    a1111 = rows[("locon kohya (diffusers names)", "A1111 (re-implemented)")]
    assert (a1111["placed"], a1111["first_problem"]) == (n - 1, ["lora_unet_up_blocks_0_upsamplers_0_conv"])
    assert rows[("locon kohya (diffusers names)", "kohya sd-scripts (re-implemented)")]["placed"] == n
    assert rows[("locon diffusers/peft (convert --to diffusers)", "diffusers (run)")]["placed"] == n
