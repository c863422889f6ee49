"""Folding ED-LoRA concepts into plain words (lorakit.fusion.edlora_fold): the folded model has no added token,
writes as a single file, and its keys / values for held-out prompts with the stand-in words follow the concept."""

import copy

import pytest
import torch

from lorakit.adapters import edlora as E
from lorakit.adapters.io import save_adapter
from lorakit.cli import main
from lorakit.fusion import concept_prompts, heldout_prompts
from lorakit.fusion.edlora_fold import ConceptFold, remove_pseudo_words, resolve_stand_ins, row_pairs
from lorakit.fusion.edlora_fold_check import kv_gap
from lorakit.fusion.gradient import Concept, GradientSettings, fuse_gradient
from lorakit.testing import random_adapter

# never fitted: the fusion fits "photo of a {}" / "{}" and scores its ridge on "a picture of {}" / "{}, high quality"
HELD_OUT = ["a drawing of {} in the snow", "{} on a red table", "two {} and a tree, night", "close-up of {}"]


def _edlora(pipe, seed, words=("<c1>", "<c2>")):
    layers = E.cross_attention_layers(pipe.unet)
    ad = random_adapter(pipe, network="lora", text_encoder=True, rank=2, alpha=2.0, seed=seed, std=0.1)
    mods = {k: m for k, m in ad.modules.items() if k.startswith("text_encoder") or ".attn" in k}
    g = torch.Generator().manual_seed(100 + seed)
    comps = [c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
    emb = {c: {w: torch.randn(len(layers), getattr(pipe, c).config.hidden_size, generator=g) * 0.5 for w in words}
           for c in comps}
    arch = "sdxl" if len(comps) == 2 else "sd1"
    return E.edlora_adapter(mods, emb, [E.EDLoRAConcept(f"c{seed}", list(words), "cat")], layers, arch)


def _concept(ad, name):
    prompts, samples, _ = concept_prompts(ad, name, None)
    val = heldout_prompts(ad, None, False)
    return Concept(name, ad, 1.0, prompts, samples, list(val), list(val))


def test_row_pairs_match_context_one_to_one_and_the_words_proportionally():
    eos, pad = 9, 9
    plain = [0, 5, 6, 7, 8, eos, pad, pad]  # start, "a", stand-in of 2 tokens (6, 7), ",", end, padding
    pseudo = [0, 5, 100, 8, eos, pad, pad, pad]  # the concept as one pseudo-word
    p, q = row_pairs(plain, pseudo, eos)
    pairs = set(zip(p, q))
    assert {(0, 0), (1, 1), (2, 2), (3, 2), (4, 3), (5, 4), (6, 5), (7, 6)} == pairs
    same = [0, 5, 6, eos, pad]
    assert row_pairs(same, same, eos) == (list(range(5)), list(range(5)))


@pytest.mark.parametrize("arch", ["sd1", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_fold_follows_the_concept_on_held_out_prompts_better_than_the_unfolded_fusion(tmp_path, arch, request):
    sd1_pipe = request.getfixturevalue(f"{arch}_pipe")  # either architecture; the name of the SD1 case kept
    ad = _edlora(sd1_pipe, 1)
    fused = copy.deepcopy(sd1_pipe)
    concepts = [_concept(ad, "c1")]
    fold = ConceptFold.prepare(fused, concepts, ["c1=tin robot"])
    out = fuse_gradient(fused, concepts, GradientSettings(steps=1, resolution=16, progress=False))
    unfolded = copy.deepcopy(fused)
    out = fold.apply(fused, concepts, out)
    assert out["fold"]["stand_ins"] == {"c1": {"text": "tin robot", "pseudo_words": "<c1> <c2>"}}
    assert out["extra"] == {} and out["edlora"] is None
    # an ordinary pipeline again: the base tokenizer and vocabulary, no hooks or per-layer processors
    for tok, enc in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        if getattr(fused, enc, None) is not None:
            n = getattr(sd1_pipe, tok).vocab_size
            assert len(getattr(fused, tok)) == n == getattr(fused, enc).get_input_embeddings().num_embeddings
    assert not hasattr(fused, "_lorakit_edlora")
    assert not any(type(p).__name__ == "LayerwiseAttnProcessor" for p in fused.unet.attn_processors.values())

    ref = copy.deepcopy(sd1_pipe)
    E.load_edlora(ref, save_adapter(ad, tmp_path / "c1.safetensors"))
    pseudo, plain = [h.format("<c1> <c2>") for h in HELD_OUT], [h.format("tin robot") for h in HELD_OUT]
    base, loose, folded = (kv_gap(m, plain, ref, pseudo) for m in (sd1_pipe, unfolded, fused))
    assert folded < 0.8 * loose < base
    # the folded to_k/to_v are full-rank deltas over the base: applying them reproduces the folded weights
    key = "unet." + E.cross_attention_layers(sd1_pipe.unet)[0] + ".to_k"
    w0 = sd1_pipe.unet.get_submodule(key[5:]).weight
    torch.testing.assert_close(w0 + out["modules"][key].delta(), fused.unet.get_submodule(key[5:]).weight,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fold_writes_a_single_file_that_diffusers_loads_with_the_base_tokenizer(tmp_path, sd1_pipe):
    from diffusers import StableDiffusionPipeline

    from lorakit.models import save_pipeline

    save_pipeline(sd1_pipe, tmp_path / "base")
    ad = _edlora(sd1_pipe, 1)
    src = str(save_adapter(ad, tmp_path / "c1.safetensors"))
    common = ["fuse", "--method", "gradient", "--base", str(tmp_path / "base"), "--adapters", src, "--steps", "1",
              "--resolution", "16", "--quiet"]
    dest = tmp_path / "folded.safetensors"
    assert main(common + ["--out", str(tmp_path / "plain.safetensors"), "--out-format", "single-file"]) == 2
    assert main(common + ["--fold-concepts", "--out", str(dest), "--out-format", "single-file"]) == 0
    got = StableDiffusionPipeline.from_single_file(str(dest), config=str(tmp_path / "base"), local_files_only=True)
    assert len(got.tokenizer) == got.tokenizer.vocab_size
    ref = copy.deepcopy(sd1_pipe)
    E.load_edlora(ref, src)
    pseudo, plain = [h.format("<c1> <c2>") for h in HELD_OUT], [h.format("c1") for h in HELD_OUT]  # default: the name
    assert kv_gap(got, plain, ref, pseudo) < 0.8 * kv_gap(sd1_pipe, plain, ref, pseudo)


@pytest.mark.parametrize("words, message", [
    (["c1=robot", "c2=robot"], r"stand-ins collide: concept c1 \('robot'\) and concept c2 \('robot'\)"),
    (["c1=robot", "c2=red robot"], "stand-ins collide"),
    (["c3=robot"], r"--concept-word c3=\.\.\.: no ED-LoRA concept of that name \(concepts: c1, c2\)"),
    (["c1=<c2> x"], "must be plain words"),
    (["c1"], "expected CONCEPT=TEXT"),
])
def test_stand_ins_that_cannot_be_folded_are_refused(sd1_pipe, words, message):
    concepts = [_concept(_edlora(sd1_pipe, 1), "a"), _concept(_edlora(sd1_pipe, 2, ("<d1>", "<d2>")), "b")]
    with pytest.raises(ValueError, match=message):
        resolve_stand_ins(sd1_pipe, concepts, words)


def test_a_stand_in_that_is_a_plain_loras_trigger_is_refused(sd1_pipe):
    lora = random_adapter(sd1_pipe, rank=2, seed=3)
    concepts = [_concept(_edlora(sd1_pipe, 1), "a"), Concept("plain", lora, 1.0, ["a robot"], ["a robot"],
                                                              trigger="zorbo, robot")]
    with pytest.raises(ValueError, match=r"stand-in 'robot' of concept c1 collides with the trigger 'robot' of plain"):
        resolve_stand_ins(sd1_pipe, concepts, ["c1=robot"])
    assert [s.text for s in resolve_stand_ins(sd1_pipe, concepts, ["c1=tin can"])] == ["tin can"]


def test_collision_exits_2_with_one_line_before_fusing(tmp_path, sd1_pipe, capsys):
    files = [str(save_adapter(_edlora(sd1_pipe, s), tmp_path / f"e{s}.safetensors")) for s in (1, 2)]
    rc = main(["fuse", "--method", "gradient", "--base", "tiny:sd1", "--adapters", *files, "--fold-concepts",
               "--concept-word", "c1=robot", "c2=robot", "--out", str(tmp_path / "x.safetensors"),
               "--out-format", "single-file", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stand-ins collide" in err[0]
    assert not (tmp_path / "x.safetensors").exists()


def test_remove_pseudo_words_restores_an_ordinary_pipeline(sd1_pipe):
    from lorakit.fusion.gradient import prepare_concepts
    from lorakit.single_file import pipeline_to_ldm

    pipe = copy.deepcopy(sd1_pipe)
    base_tok = copy.deepcopy(pipe.tokenizer)
    prepare_concepts(pipe, [_concept(_edlora(sd1_pipe, 1), "a")])  # tokens, rows, hooks, processors; no LoRA
    assert len(pipe.tokenizer) > base_tok.vocab_size
    remove_pseudo_words(pipe, {"tokenizer": base_tok})
    sd = pipeline_to_ldm(pipe)  # no longer refused
    emb = sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    torch.testing.assert_close(emb, sd1_pipe.text_encoder.get_input_embeddings().weight)
    gen = torch.Generator().manual_seed(0)
    got = pipe(prompt="a cat", num_inference_steps=1, output_type="latent", height=16, width=16, generator=gen).images
    gen = torch.Generator().manual_seed(0)
    want = sd1_pipe(prompt="a cat", num_inference_steps=1, output_type="latent", height=16, width=16,
                    generator=gen).images
    torch.testing.assert_close(got, want)
