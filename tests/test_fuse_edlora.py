"""Gradient fusion of ED-LoRA files: concept embeddings concatenated (clashing pseudo-words renamed), layer-wise
text features feed the to_k/to_v stage."""

import copy

import pytest
import torch

from lorakit.adapters import edlora as E
from lorakit.adapters.io import load_adapter, save_adapter
from lorakit.fusion import concept_prompts
from lorakit.fusion.gradient import Concept, GradientSettings, fuse_gradient
from lorakit.testing import random_adapter


def _edlora(pipe, seed, words=("<c1>", "<c2>")):
    layers = E.cross_attention_layers(pipe.unet)
    ad = random_adapter(pipe, network="lora", text_encoder=True, rank=2, alpha=2.0, seed=seed, std=0.1)
    mods = {k: m for k, m in ad.modules.items() if k.startswith("text_encoder") or ".attn" in k}
    g = torch.Generator().manual_seed(100 + seed)
    dim = pipe.text_encoder.config.hidden_size
    emb = {"text_encoder": {w: torch.randn(len(layers), dim, generator=g) * 0.5 for w in words}}
    return E.edlora_adapter(mods, emb, [E.EDLoRAConcept(f"c{seed}", list(words), "cat")], layers, "sd1")


def _concept(ad, name):
    prompts, samples, _ = concept_prompts(ad, name, None)
    return Concept(name, ad, 1.0, prompts, samples)


def test_one_edlora_concept_reproduces_its_layerwise_text_features(tmp_path, sd1_pipe):
    ad = _edlora(sd1_pipe, 1)
    fused = copy.deepcopy(sd1_pipe)
    out = fuse_gradient(fused, [_concept(ad, "c1")], GradientSettings(steps=1, resolution=16, progress=False,
                                                                      ridge=1e-6))
    assert out["edlora"]["concepts"][0]["words"] == ["<c1>", "<c2>"]
    own = copy.deepcopy(sd1_pipe)
    E.load_edlora(own, save_adapter(ad, tmp_path / "c1.safetensors"))
    prompt = "photo of a <c1> <c2>"
    f_fused, f_own = E.layer_hidden_states(fused, prompt), E.layer_hidden_states(own, prompt)
    assert f_fused.shape[0] == len(E.cross_attention_layers(sd1_pipe.unet))
    # every layer variant, every position the fusion fits (start .. end token; padding rows are never fitted)
    ids = sd1_pipe.tokenizer(prompt).input_ids
    torch.testing.assert_close(f_fused[:, :, : len(ids)], f_own[:, :, : len(ids)], rtol=1e-3, atol=1e-3)
    assert (f_own[0] - f_own[-1]).abs().max() > 1e-2  # the layer variants really differ
    # the fused-delta carries the embeddings: loading it gives the same features
    assert not any(r["residual"] is None or r["residual"] > 1e-4 for r in out["layers"].values())


def test_two_edlora_concepts_with_clashing_words_are_renamed(tmp_path, sd1_pipe):
    from lorakit.cli import main

    a, b = _edlora(sd1_pipe, 1), _edlora(sd1_pipe, 2)  # same pseudo-words in both files
    paths = [str(save_adapter(x, tmp_path / f"e{i}.safetensors")) for i, x in enumerate((a, b))]
    dest = tmp_path / "fused.safetensors"
    with pytest.warns(UserWarning, match="taken by another input"):
        rc = main(["fuse", "--method", "gradient", "--base", "tiny:sd1", "--adapters", *paths, "--out", str(dest),
                   "--out-format", "adapter", "--steps", "1", "--resolution", "16", "--quiet"])
    assert rc == 0
    fused = load_adapter(dest)
    assert fused.metadata["lorakit.kind"] == "fused-delta"
    info, table = E.read_edlora(fused, dest)
    assert [c["words"] for c in info["concepts"]] == [["<c1>", "<c2>"], ["<c1#2>", "<c2#2>"]]
    torch.testing.assert_close(table["text_encoder"]["<c1#2>"], b.extra["edlora_emb.text_encoder.<c1>"])
    torch.testing.assert_close(table["text_encoder"]["<c1>"], a.extra["edlora_emb.text_encoder.<c1>"])
    # the fused file loads like any ED-LoRA: both concepts' tokens, the fused delta as its LoRA
    pipe = copy.deepcopy(sd1_pipe)
    loaded = E.load_edlora(pipe, dest)
    assert loaded["words"] == {"<c1>": "<c1>", "<c2>": "<c2>", "<c1#2>": "<c1#2>", "<c2#2>": "<c2#2>"}
    assert set(fused.modules) == set(a.modules) | set(b.modules)
    # lorakit sample's loader sends the fused delta through load_edlora too (its tokens, not a plain LoRA)
    from lorakit.sampling.loading import load_adapters

    sampled = copy.deepcopy(sd1_pipe)
    load_adapters(sampled, [dest])
    assert "<c1#2>" in sampled.tokenizer.get_vocab()
    torch.testing.assert_close(E.layer_hidden_states(sampled, "a <c1#2> <c2#2>"),
                               E.layer_hidden_states(pipe, "a <c1#2> <c2#2>"))


def test_nan_in_an_edlora_embedding_names_the_file_and_word(sd1_pipe):
    ad = _edlora(sd1_pipe, 1)
    key = next(k for k in ad.extra if "<c2>" in k)
    ad.extra[key][3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"broken: the text_encoder embedding of <c2> has NaN or inf"):
        fuse_gradient(copy.deepcopy(sd1_pipe), [_concept(ad, "broken")],
                      GradientSettings(steps=1, resolution=16, progress=False))
