"""--masks attention: delta composition with each adapter's difference confined to where the base's cross-attention
puts its comma tag (a style everywhere, a background around the other adapters)."""

import copy

import pytest
import torch

from lorakit.adapters.io import save_adapter
from lorakit.sampling import SamplerSettings, generate, load_adapters
from lorakit.sampling.attention_masks import AttentionMasks, tag_token_spans
from lorakit.sampling.methods import Term
from lorakit.testing import random_adapter

PROMPT = "kwibbit frog, hattock hat, nocturo night background"


def test_each_trigger_gets_the_tokens_of_its_comma_tag(sd1_pipe):
    tok = sd1_pipe.tokenizer
    spans = tag_token_spans(tok, PROMPT, ["kwibbit", "nocturo"])
    ids = tok(PROMPT).input_ids
    for span, tag in zip(spans, ("kwibbit frog", "nocturo night background")):
        assert [ids[i] for i in span] == tok(tag, add_special_tokens=False).input_ids
    assert spans[0][0] == 1  # right after the start token
    with pytest.raises(ValueError, match="trigger 'zorbo' is in no comma tag"):
        tag_token_spans(tok, PROMPT, ["zorbo"])
    # --prompt-parts class-words: the masks come from the base's pass on the prompt without triggers
    base = "frog, hat, night background"
    spans = tag_token_spans(tok, PROMPT, ["kwibbit", "hattock", "nocturo"], base)
    ids = tok(base).input_ids
    assert [[ids[i] for i in s] for s in spans] == [tok(t, add_special_tokens=False).input_ids
                                                    for t in ("frog", "hat", "night background")]
    with pytest.raises(ValueError, match="does not have the comma tags"):
        tag_token_spans(tok, PROMPT, ["kwibbit"], "frog, hat")


def test_masks_are_normalised_per_image_and_a_background_takes_the_rest():
    m = AttentionMasks([[1], [2], [3]], ["character", "style", "background"], (4, 4), cfg=False)
    base = Term((), 1.0, 1.0)
    m.before_pass(base)  # the base pass records its cross-attention
    probs = torch.rand(2, 16, 5, generator=torch.Generator().manual_seed(0))
    m.add(probs)  # a layer at the latent's own resolution
    m.add(torch.rand(2, 1, 5))  # a 1x1 layer: coarser than half the finest (4x4), left out
    out = torch.randn(2, 4, 4, 4)
    assert m.after_pass(base, out) is out
    char, style, bg = m.masks[:, 0], m.masks[:, 1], m.masks[:, 2]
    assert torch.allclose(char.amin((1, 2)), torch.zeros(2)) and torch.allclose(char.amax((1, 2)), torch.ones(2))
    expected = probs[..., 1].view(2, 4, 4)
    expected = (expected - expected.amin((1, 2), keepdim=True)) / (expected.amax((1, 2), keepdim=True)
                                                                 - expected.amin((1, 2), keepdim=True))
    assert torch.allclose(char, expected, atol=1e-6)
    assert (style == 1).all() and torch.allclose(bg, 1 - char)
    adapter_out = torch.randn(2, 4, 4, 4)  # an adapter pass: base + M * (its output - base)
    assert torch.allclose(m.after_pass(Term((0,), 1.0, 1.0), adapter_out), out + char[:, None] * (adapter_out - out))
    hard = AttentionMasks([[1], [2], [3]], ["character", "style", "background"], (4, 4), cfg=False, threshold=0.3)
    hard.before_pass(base)
    hard.add(probs)
    hard.after_pass(base, out)
    assert torch.equal(hard.masks[:, 0], (char >= 0.3).float()) and torch.equal(hard.masks[:, 2], (char < 0.3).float())


def test_masks_of_one_everywhere_give_delta_and_attention_masks_change_it(tmp_path, sd1_pipe):
    pipe = copy.deepcopy(sd1_pipe)
    files = [save_adapter(random_adapter(pipe, seed=k, std=0.3), tmp_path / f"a{k}.safetensors") for k in range(2)]
    ads = load_adapters(pipe, files, [1.0, 1.0])
    before = dict(pipe.unet.attn_processors)

    def run(masks, kinds):
        st = SamplerSettings(method="delta", steps=3, cfg=4.0, triggers=("kwibbit", "nocturo"), masks=masks)
        return generate(pipe, ads, st, PROMPT, "", [5], output_type="latent", kinds=kinds)[0]

    delta = run("none", None)
    assert torch.allclose(run("attention", ["style", "style"]), delta, atol=1e-5)  # styles: mask 1
    assert torch.allclose(run("attention", ["background", "background"]), delta, atol=1e-5)  # nothing to avoid
    masked = run("attention", ["character", "background"])
    assert (masked - delta).abs().max() > 1e-3
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}


def test_bad_masks_settings_name_what_is_wrong(tmp_path, sd1_pipe):
    for bad, msg in (({"method": "merge", "masks": "attention"}, "needs method delta"),
                     ({"method": "delta", "masks": "attention", "prompt_parts": "per-adapter"}, "prompt_parts joint"),
                     ({"method": "delta", "masks": "boxes"}, "masks must be one of none, attention"),
                     ({"method": "delta", "mask_threshold": 0.3}, "mask_threshold needs masks attention"),
                     ({"method": "delta", "masks": "attention", "mask_threshold": 1.0}, r"in \(0, 1\)")):
        with pytest.raises(ValueError, match=msg):
            SamplerSettings(**bad).check()
    pipe = copy.deepcopy(sd1_pipe)
    ads = load_adapters(pipe, [save_adapter(random_adapter(pipe, seed=0), tmp_path / "a.safetensors")], [1.0])
    st = SamplerSettings(method="delta", steps=2, masks="attention")
    with pytest.raises(ValueError, match="one trigger per adapter"):  # no --triggers, no lorakit.trigger metadata
        generate(pipe, ads, st, PROMPT, "", [0])
    st = SamplerSettings(method="delta", steps=2, masks="attention", triggers=("kwibbit",))
    with pytest.raises(ValueError, match="got 2 kinds for 1 adapters"):
        generate(pipe, ads, st, PROMPT, "", [0], kinds=["character", "style"])
