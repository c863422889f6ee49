"""ED-LoRA trainer on the tiny SD1 pipeline: only new rows train, save -> load equality, resume, 2 processes."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.adapters import edlora as ed
from lorakit.adapters.io import load_adapter
from lorakit.config import ConfigError, load_config
from lorakit.testing import reset_accelerate
from lorakit.training.edlora import EDLoRAConfig, encode_captions, text_sides, train

ROOT = Path(__file__).resolve().parents[1]
PAPER_LRS = ["learning_rate=1e-4", "text_encoder_lr=1e-5", "embedding_lr=1e-3", "lr_scheduler=linear"]


def make_concept_folder(root: Path, n: int = 4, masks: bool = True) -> tuple[Path, Path]:
    """n 32x32 images of a yellow square on blue with captions '<TOK>' and masks of the square."""
    img_dir, mask_dir = root / "img", root / "masks"
    img_dir.mkdir(parents=True)
    mask_dir.mkdir()
    for i in range(n):
        a = np.zeros((32, 32, 3), np.uint8)
        a[:] = (30, 60, 200)
        a[8:24, 6 + 2 * i : 22 + 2 * i] = (250, 200, 0)
        Image.fromarray(a).save(img_dir / f"{i:03d}.png")
        (img_dir / f"{i:03d}.txt").write_text("a photo of <TOK> on the beach" if i % 2 else "<TOK>, sitting")
        if masks:
            m = np.zeros((32, 32), np.uint8)
            m[8:24, 6 + 2 * i : 22 + 2 * i] = 255
            Image.fromarray(m).save(mask_dir / f"{i:03d}.png")
    return img_dir, mask_dir


def cfg_for(tmp_path, img_dir, *extra):
    return load_config(EDLoRAConfig, ROOT / "train_configs" / "toy_edlora_character.yaml", [
        "base_model=tiny:sd1", f"data.path={img_dir}", f"output_dir={tmp_path / 'out'}", "max_steps=2",
        "seed=3", "logging=none", "data.resolution=32", "train_batch_size=2", "concept.tokens=<cat1> <cat2>",
        "concept.init_word=cat", "concept.placeholder=<TOK>", "concept.name=cat", "checkpointing_steps=0",
        "sample_every=0", *PAPER_LRS, *extra,
    ])


def tensors(path):
    a = load_adapter(path)
    out = {f"{k}.down": m.down for k, m in a.modules.items()}
    out.update({f"{k}.up": m.up for k, m in a.modules.items()})
    out.update(a.extra)
    return out


def test_training_changes_only_new_rows_and_save_load_is_identical(sd1_pipe, tmp_path):
    img_dir, mask_dir = make_concept_folder(tmp_path)
    cfg = cfg_for(tmp_path, img_dir, f"mask_path={mask_dir}", "masked_loss=true", "attn_reg_weight=0.01")
    reset_accelerate()
    pipe = copy.deepcopy(sd1_pipe)
    result = train(cfg, pipe=pipe)
    final = Path(result.final_path)
    assert final == max((tmp_path / "out").glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)

    # 1) only the new rows moved: the base rows, every other text-encoder / UNet weight are the base's
    L = 16
    emb = pipe.text_encoder.get_input_embeddings()
    assert isinstance(emb, ed.TrainableTokenRows) and emb.rows.shape == (2 * L, 32)
    base_w = sd1_pipe.text_encoder.get_input_embeddings().weight
    merged = emb.merged().weight
    assert merged.shape[0] == base_w.shape[0] + 2 * L
    assert torch.equal(merged[: base_w.shape[0]], base_w)
    base_params = dict(sd1_pipe.text_encoder.named_parameters())
    for name, p in pipe.text_encoder.named_parameters():
        if "lora_" not in name and "token_embedding" not in name:  # (embedding rows: checked above)
            key = name.replace(".base_layer", "")
            assert torch.equal(p, base_params[key]), name
    cat_id = pipe.tokenizer("cat", add_special_tokens=False).input_ids[0]
    init2 = base_w[cat_id].expand(L, -1)
    assert not torch.allclose(emb.rows[L:], init2)  # trained away from the class word ...
    assert (emb.rows[L:] - init2).abs().max() < 0.1  # ... by two lr=1e-3 steps
    meta = load_adapter(final).metadata
    assert meta["lorakit.kind"] == "edlora" and meta["lorakit.trigger"] == "<cat1> <cat2>"
    assert len([k for k in load_adapter(final).modules if k.startswith("unet.")]) == 4 * 32  # 32 attention layers

    # 2) save -> load: the in-memory trained pipeline and a fresh base + load_edlora give the same image
    sides = text_sides(pipe, ["<cat1>", "<cat2>"], L)
    prompt = "a photo of <cat1> <cat2> on the beach"
    with torch.no_grad():
        cond = encode_captions([prompt], sides, {"text_encoder": pipe.text_encoder}, L, "cpu")
        neg = encode_captions([""], sides, {"text_encoder": pipe.text_encoder}, L, "cpu")
    kw = dict(num_inference_steps=2, guidance_scale=3.0, output_type="np")
    want = pipe(prompt_embeds=cond["encoder_hidden_states"], negative_prompt_embeds=neg["encoder_hidden_states"],
                generator=torch.Generator().manual_seed(0), **kw).images
    fresh = copy.deepcopy(sd1_pipe)
    ed.load_edlora(fresh, final)
    got = fresh(prompt, generator=torch.Generator().manual_seed(0), **kw).images
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_resume_is_exact(sd1_pipe, tmp_path):
    img_dir, _ = make_concept_folder(tmp_path, masks=False)
    reset_accelerate()
    full = train(cfg_for(tmp_path / "a", img_dir, "max_steps=2"), pipe=copy.deepcopy(sd1_pipe))
    reset_accelerate()
    train(cfg_for(tmp_path / "b", img_dir, "max_steps=2", "stop_at_step=1"), pipe=copy.deepcopy(sd1_pipe))
    reset_accelerate()
    resumed = train(cfg_for(tmp_path / "b", img_dir, "max_steps=2", "resume=latest"), pipe=copy.deepcopy(sd1_pipe))
    a, b = tensors(full.final_path), tensors(resumed.final_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow  # 27-90 s in CI (2 processes / several trainings)
def test_two_processes_equal_one(tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 (gloo, CPU) x batch 1 == 1 process x batch 2."""
    img_dir, _ = make_concept_folder(tmp_path, masks=False)
    args = ["--config", str(ROOT / "train_configs/toy_edlora_character.yaml"), "base_model=tiny:sd1",
            f"data.path={img_dir}", "max_steps=2", "seed=3", "logging=none", "data.resolution=32",
            "concept.tokens=<cat1> <cat2>", "concept.init_word=cat", "concept.placeholder=<TOK>", "checkpointing_steps=0",
            "checkpoint_at_end=false", "sample_every=0", *PAPER_LRS]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
         str(ROOT / "train_edlora.py"), *args, f"output_dir={tmp_path / 'two'}", "train_batch_size=1"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    reset_accelerate()
    cfg = load_config(EDLoRAConfig, args[1], args[2:] + [f"output_dir={tmp_path / 'one'}", "train_batch_size=2"])
    one = train(cfg)
    a, b = tensors(one.final_path), tensors(tmp_path / "two" / "edlora.safetensors")
    assert a.keys() == b.keys()
    bad = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.allclose(a[k], b[k], rtol=0, atol=1e-5)}
    assert not bad, sorted(bad.items(), key=lambda kv: -kv[1])[:8]


def test_bad_inputs_are_named(tmp_path):
    img_dir, _ = make_concept_folder(tmp_path, masks=False)
    (img_dir / "000.txt").write_text("a photo of a cat")
    with pytest.raises(ValueError, match="000.png.*placeholder"):
        train(cfg_for(tmp_path, img_dir))
    (img_dir / "000.txt").write_text("<TOK>")
    with pytest.raises(ValueError, match="concept.tokens"):
        train(cfg_for(tmp_path, img_dir, "concept.tokens=<one>"))
    with pytest.raises(ValueError, match="mask_path"):
        train(cfg_for(tmp_path, img_dir, "masked_loss=true"))
    with pytest.raises(FileNotFoundError, match="no mask for"):
        train(cfg_for(tmp_path, img_dir, f"mask_path={tmp_path}"))
    with pytest.raises(ConfigError, match="init_word"):
        cfg_for(tmp_path, img_dir, "concept.init_wrd=cat")


def test_sdxl_trains_and_loads_identically(sdxl_pipe, tmp_path):
    img_dir, _ = make_concept_folder(tmp_path, n=2, masks=False)
    reset_accelerate()
    pipe = copy.deepcopy(sdxl_pipe)
    result = train(cfg_for(tmp_path, img_dir, "base_model=tiny:sdxl", "max_steps=1", "concept.name=cat"), pipe=pipe)
    L = len(ed.cross_attention_layers(pipe.unet))
    adapter = load_adapter(result.final_path)
    assert adapter.extra["edlora_emb.text_encoder_2.<cat2>"].shape == (L, 32)
    assert any(k.startswith("text_encoder_2.") for k in adapter.modules)
    sides = text_sides(pipe, ["<cat1>", "<cat2>"], L)
    assert len(sides) == 2
    encoders = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    prompt = "a photo of <cat1> <cat2>"
    with torch.no_grad():
        cond = encode_captions([prompt], sides, encoders, L, "cpu")
        neg = encode_captions([""], sides, encoders, L, "cpu")
    kw = dict(num_inference_steps=2, guidance_scale=3.0, output_type="np")
    want = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["text_embeds"],
                negative_prompt_embeds=neg["encoder_hidden_states"], negative_pooled_prompt_embeds=neg["text_embeds"],
                generator=torch.Generator().manual_seed(0), **kw).images
    fresh = copy.deepcopy(sdxl_pipe)
    ed.load_edlora(fresh, result.final_path)
    # diffusers zeroes the negative embeddings of an empty negative prompt for SDXL; pass it explicitly
    got = fresh(prompt, negative_prompt="", generator=torch.Generator().manual_seed(0), **kw).images
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_attention_regulariser_is_zero_inside_the_mask_only():
    from lorakit.training.edlora import attention_regulariser

    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    inside = torch.nn.functional.interpolate(mask, size=(4, 4), mode="area").flatten(1)  # a layer at 4x4
    maps = [torch.stack([inside, inside * 0.5], -1)]  # [B=1, N=16, W=2], both words exactly on the mask
    present = torch.ones(1, 2)
    assert float(attention_regulariser(maps, mask, present)) == pytest.approx(0.0, abs=1e-7)
    outside = [torch.stack([1 - inside, 1 - inside], -1)]
    assert float(attention_regulariser(outside, mask, present)) > 0.5
    assert float(attention_regulariser(outside, mask, torch.zeros(1, 2))) == 0.0  # words absent: no penalty


def test_sampling_during_training_keeps_one_progress_bar(sd1_pipe, tmp_path, capfd):
    """The sample grid's pipeline run prints no bar of its own under the training bar (it used to nest an
    unlabelled 'it/s' bar below 'train')."""
    img_dir, _ = make_concept_folder(tmp_path, masks=False)
    cfg = cfg_for(tmp_path, img_dir, "sample_every=2", "sample_num_inference_steps=3", "sample_prompts=[<TOK>]")
    reset_accelerate()
    pipe = copy.deepcopy(sd1_pipe)
    pipe.set_progress_bar_config()  # a base as models.load_base returns it: diffusers' bar on
    result = train(cfg, pipe=pipe)
    assert result.samples and Path(result.samples[-1]).is_file()
    err = capfd.readouterr().err.replace("\r", "\n")
    bars = [line for line in err.splitlines() if "|" in line and ("it/s" in line or "s/it" in line or "/3 [" in line)]
    assert not bars, bars[:3]


def test_initial_rows_are_made_on_the_text_encoders_device(tmp_path):
    """The trainer places the base on the accelerator before adding the rows; on CUDA the CPU-drawn first word met
    the class word's CUDA row in one torch.cat and failed. A meta-device table stands in for the GPU here."""
    from lorakit.models import load_base
    from lorakit.training.edlora import _init_rows

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(1000, 8, device="meta")

        def get_input_embeddings(self):
            return self.emb

    tokenizer = load_base("tiny:sd1").tokenizer
    img_dir, _ = make_concept_folder(tmp_path)
    rows = _init_rows(cfg_for(tmp_path, img_dir), tokenizer, Encoder(), 3, torch.Generator().manual_seed(0))
    assert rows.device.type == "meta" and rows.shape == (6, 8)
