"""ED-LoRA machinery: layer tokens, per-layer cross-attention routing, file format, load_edlora."""

import copy
import json

import pytest
import torch

from lorakit.adapters import edlora as ed
from lorakit.adapters.io import AdapterError, apply_adapter, load_adapter, save_adapter
from lorakit.models import pipeline_arch
from lorakit.testing import random_adapter

ATTN = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def random_edlora(pipe, words, path, seed=0, std=0.3):
    """Write an ED-LoRA file with random LoRA weights (attention only) and random layer embeddings."""
    adapter = random_adapter(pipe, text_encoder=True, seed=seed, std=0.05)
    modules = {k: m for k, m in adapter.modules.items() if k.endswith(ATTN)}
    layers = ed.cross_attention_layers(pipe.unet)
    g = torch.Generator().manual_seed(seed + 100)
    emb = {
        comp: {w: torch.randn(len(layers), getattr(pipe, comp).config.hidden_size, generator=g) * std for w in words}
        for comp in ("text_encoder", "text_encoder_2")
        if getattr(pipe, comp, None) is not None
    }
    concept = ed.EDLoRAConcept(name=words[0].strip("<>"), words=list(words), init_word="cat")
    out = ed.edlora_adapter(modules, emb, [concept], layers, pipeline_arch(pipe), rank=4, alpha=2.0)
    save_adapter(out, path)
    return out


def run_pipe(pipe, prompt, **kw):
    g = torch.Generator().manual_seed(0)
    args = dict(num_inference_steps=2, guidance_scale=3.0, generator=g, output_type="np")
    args.update(kw)
    return torch.from_numpy(pipe(prompt, **args).images)


def test_new_tokens_are_two_per_cross_attention_layer(sd1_pipe, sdxl_pipe):
    for base in (sd1_pipe, sdxl_pipe):
        pipe = copy.deepcopy(base)
        layers = ed.cross_attention_layers(pipe.unet)
        n_attn2 = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("attn2"))
        assert len(layers) == n_attn2 and n_attn2 > 0
        # down -> mid -> up order
        kinds = [n.split(".")[0] for n in layers]
        assert kinds == sorted(kinds, key=["down_blocks", "mid_block", "up_blocks"].index)
        for comp, tok_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            enc = getattr(pipe, comp, None)
            if enc is None:
                continue
            tok = getattr(pipe, tok_name)
            n_tok, n_rows = len(tok), enc.get_input_embeddings().weight.shape[0]
            tmap = ed.add_concept_tokens(tok, enc, ["<x1>", "<x2>"], len(layers))
            assert len(tok) - n_tok == 2 * len(layers)
            assert enc.get_input_embeddings().weight.shape[0] - n_rows == 2 * len(layers)
            assert len(tmap) == 2 and all(len(v) == len(layers) for v in tmap.values())
            with pytest.raises(ValueError, match="already in the tokenizer"):
                ed.add_concept_tokens(tok, enc, ["<x1>"], len(layers))
    assert len(ed.cross_attention_layers(sd1_pipe.unet)) == 16  # tiny SD1 has SD1.5's 16 cross-attention layers


def test_layer_variant_ids_replace_each_word():
    ids = torch.tensor([[1, 5, 7, 5, 2]])
    out = ed.layer_variant_ids(ids, {5: [5, 50, 51], 7: [7, 70, 71]}, 3)
    assert out.shape == (3, 1, 5)
    assert out[:, 0].tolist() == [[1, 5, 7, 5, 2], [1, 50, 70, 50, 2], [1, 51, 71, 51, 2]]


class Recorder:
    def __init__(self, inner, log, layer):
        self.inner, self.log, self.layer = inner, log, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        self.log.append((self.layer, encoder_hidden_states.detach().clone()))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_cross_attention_layer_reads_its_own_variant(arch, sd1_pipe, sdxl_pipe):
    pipe = copy.deepcopy(sd1_pipe if arch == "sd1" else sdxl_pipe)
    layers = ed.cross_attention_layers(pipe.unet)
    L = len(layers)
    comps = [c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
    per_enc, maps = [], {}
    for comp, tok in zip(comps, ("tokenizer", "tokenizer_2")):
        enc, tokenizer = getattr(pipe, comp), getattr(pipe, tok)
        rows = {w: torch.randn(L, enc.config.hidden_size) for w in ("<c1>", "<c2>")}
        maps[comp] = ed.add_concept_tokens(tokenizer, enc, list(rows), L, rows)
        ids = tokenizer(["a photo of <c1> <c2> cat", "a dog"], padding="max_length", max_length=77,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            lw = ed.encode_layerwise(enc, ids, maps[comp], L, tokenizer.eos_token_id)
            # reference: copy l encoded alone, by plain text-encoder calls
            for l in (0, L - 1):
                ref = enc(ed.layer_variant_ids(ids, maps[comp], L)[l]).last_hidden_state
                torch.testing.assert_close(lw.hidden[l], ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(lw.hidden[0, 0], lw.hidden[1, 0])  # copies differ where the words are
        torch.testing.assert_close(lw.hidden[0, 1], lw.hidden[5, 1])  # ...and agree for the prompt without them
        per_enc.append(lw.hidden)
    dims = tuple(getattr(pipe, c).config.hidden_size for c in comps)
    ed.install_layerwise_processors(pipe.unet, dims)
    log = []
    for i, name in enumerate(layers):
        proc = pipe.unet.get_submodule(name).processor
        proc.inner = Recorder(proc.inner, log, i)
    packed = ed.pack_layers(per_enc)
    assert packed.shape == (2, 77, L * sum(dims))
    torch.testing.assert_close(ed.unpack_layers(packed, L, dims), torch.cat(per_enc, -1))
    from lorakit.testing import unet_inputs

    inputs = unet_inputs(pipe, batch=2)
    inputs["encoder_hidden_states"] = packed
    with torch.no_grad():
        pipe.unet(**inputs)
    assert [l for l, _ in log] == list(range(L))  # every layer once, in execution order down -> mid -> up
    want = torch.cat(per_enc, -1)
    for l, seen in log:
        torch.testing.assert_close(seen, want[l])
    # plain (unpacked) features still pass through unchanged
    log.clear()
    inputs["encoder_hidden_states"] = want[3]
    with torch.no_grad():
        pipe.unet(**inputs)
    assert all(torch.equal(seen, want[3]) for _, seen in log)
    inputs["encoder_hidden_states"] = torch.randn(2, 77, sum(dims) + 1)
    with pytest.raises(ValueError, match="channels"):
        pipe.unet(**inputs)


def test_trainable_rows_only_new_rows_change():
    base = torch.nn.Embedding(10, 4)
    before = base.weight.detach().clone()
    mod = ed.TrainableTokenRows(base, 10, torch.zeros(3, 4))
    ids = torch.tensor([[1, 10, 12, 3]])
    out = mod(ids)
    torch.testing.assert_close(out[0, 0], before[1])
    assert torch.equal(out[0, 1], torch.zeros(4))
    out.sum().backward()
    assert base.weight.grad is None and mod.rows.grad[[0, 2]].eq(1).all() and mod.rows.grad[1].eq(0).all()
    merged = mod.merged()
    assert merged.weight.shape == (13, 4) and torch.equal(merged.weight[:10], before)


def test_file_format_and_prompts_in_an_ordinary_pipeline_call(sd1_pipe, tmp_path):
    path = tmp_path / "cat.safetensors"
    written = random_edlora(sd1_pipe, ["<cat1>", "<cat2>"], path)
    raw = load_adapter(path)
    assert raw.metadata["lorakit.kind"] == "edlora" and raw.metadata["lorakit.trigger"] == "<cat1> <cat2>"
    info = json.loads(raw.metadata["lorakit.edlora"])
    assert info["n_layers"] == 16 and info["concepts"][0]["tokens"]["<cat1>"][1] == "<cat1>@1"
    assert raw.extra["edlora_emb.text_encoder.<cat1>"].shape == (16, 32)
    assert set(raw.modules) == set(written.modules)

    pipe = copy.deepcopy(sd1_pipe)
    res = ed.load_edlora(pipe, path)
    assert res["concepts"] == {"cat1": "<cat1> <cat2>"} and pipe.get_active_adapters() == ["cat"]
    prompt = "a photo of <cat1> <cat2> on the beach"
    out = run_pipe(pipe, prompt)

    # reference, built by hand: tokens + rows, processors, LoRA, features packed explicitly
    ref = copy.deepcopy(sd1_pipe)
    _, table = ed.read_edlora(raw)
    tmap = ed.add_concept_tokens(ref.tokenizer, ref.text_encoder, ["<cat1>", "<cat2>"], 16, table["text_encoder"])
    ed.install_layerwise_processors(ref.unet, (32,))
    apply_adapter(ref, raw, "ref")

    def packed(text):
        ids = ref.tokenizer([text], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return ed.pack_layers([ed.encode_layerwise(ref.text_encoder, ids, tmap, 16, ref.tokenizer.eos_token_id).hidden])

    want = run_pipe(ref, None, prompt_embeds=packed(prompt), negative_prompt_embeds=packed(""))
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    tm = ed.loaded_token_maps(pipe)["text_encoder"]
    assert tm == {k: v for k, v in tmap.items()}  # same ids as adding the tokens by hand to the same base
    per_layer = ed.layer_hidden_states(pipe, prompt)
    assert per_layer.shape == (16, 1, 77, 32)
    torch.testing.assert_close(ed.pack_layers([per_layer]), packed(prompt), rtol=0, atol=1e-6)
    # the pseudo-words matter: without them the image differs
    assert (run_pipe(pipe, "a photo of cat on the beach") - out).abs().max() > 1e-3


def test_two_edloras_side_by_side(sd1_pipe, tmp_path):
    a, b, b_same = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "b_same.safetensors"
    random_edlora(sd1_pipe, ["<a1>", "<a2>"], a, seed=1)
    random_edlora(sd1_pipe, ["<b1>", "<b2>"], b, seed=2)
    random_edlora(sd1_pipe, ["<a1>", "<a2>"], b_same, seed=2)  # B's weights, but trained with A's words
    pa, pb = "a photo of <a1> <a2> in the sky", "a photo of <b1> <b2> on the grass"

    alone = {}
    for f, prompt in ((a, pa), (b, pb)):
        pipe = copy.deepcopy(sd1_pipe)
        ed.load_edlora(pipe, f)
        alone[f.stem] = run_pipe(pipe, prompt)

    both = copy.deepcopy(sd1_pipe)
    ed.load_edlora(both, a)
    ed.load_edlora(both, b, scale=0.5)
    assert sorted(both.get_active_adapters()) == ["a", "b"]
    both.set_adapters("a")
    torch.testing.assert_close(run_pipe(both, pa), alone["a"], rtol=0, atol=1e-5)
    both.set_adapters("b")
    torch.testing.assert_close(run_pipe(both, pb), alone["b"], rtol=0, atol=1e-5)

    clash = copy.deepcopy(sd1_pipe)
    ed.load_edlora(clash, a)
    res = ed.load_edlora(clash, b_same)
    assert res["words"] == {"<a1>": "<a1#2>", "<a2>": "<a2#2>"} and res["concepts"] == {"a1": "<a1#2> <a2#2>"}
    clash.set_adapters("b_same")
    torch.testing.assert_close(run_pipe(clash, "a photo of <a1#2> <a2#2> on the grass"), alone["b"], rtol=0, atol=1e-5)
    clash.set_adapters("a")
    torch.testing.assert_close(run_pipe(clash, pa), alone["a"], rtol=0, atol=1e-5)


def test_sdxl_pipeline_call_and_bad_files(sdxl_pipe, sd1_pipe, tmp_path):
    path = tmp_path / "x.safetensors"
    random_edlora(sdxl_pipe, ["<x1>", "<x2>"], path)
    pipe = copy.deepcopy(sdxl_pipe)
    ed.load_edlora(pipe, path)
    out = run_pipe(pipe, "a photo of <x1> <x2>")
    assert out.shape == (1, 32, 32, 3) and torch.isfinite(out).all()
    assert ed.layer_hidden_states(pipe, ["<x1> <x2>", "a"]).shape == (17, 2, 77, 64)
    assert ed.load_edlora(pipe, path)["adapter_name"] == "x_2"  # same file again: a unique adapter name
    with pytest.raises(AdapterError, match="already loaded"):
        ed.load_edlora(pipe, path, adapter_name="x")
    assert run_pipe(pipe, "<x1> <x2>", num_images_per_prompt=2).shape == (2, 32, 32, 3)
    with pytest.raises(AdapterError, match="cross-attention layers|adapter is for"):
        ed.load_edlora(copy.deepcopy(sd1_pipe), path)
    plain = tmp_path / "plain.safetensors"
    save_adapter(random_adapter(sd1_pipe), plain)
    with pytest.raises(AdapterError, match="not an ED-LoRA"):
        ed.load_edlora(copy.deepcopy(sd1_pipe), plain)
