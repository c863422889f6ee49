"""Gradient fusion's shared capture passes: one forward pass runs several concepts, each prompt with its own
concept's weights (LoRA deltas added per prompt by hooks), and the statistics equal one pass per concept."""

import copy

import pytest
import torch

from lorakit.fusion.capture import GramCollector, concept_runs
from lorakit.fusion.gradient import Concept, build_problems, stage_of
from lorakit.fusion.gradient_stages import ConceptWeights
from lorakit.testing import random_adapter


@pytest.fixture(scope="module")
def two_locon(sd1_pipe):
    pipe = copy.deepcopy(sd1_pipe)
    ads = [random_adapter(pipe, "all", network=net, text_encoder=False, rank=r, alpha=float(r), seed=s, std=0.2)
           for s, net, r in ((1, "locon", 4), (2, "lora", 2))]
    concepts = [Concept(f"c{i}", ad, 1.0, ["x"], ["x"]) for i, ad in enumerate(ads)]
    probs = [p for p in build_problems(pipe, concepts).values() if stage_of(p.key) == "unet"]
    assert any(p.is_conv for p in probs) and any(not p.is_conv for p in probs)
    return pipe, probs


def _unet(pipe, x, t, emb):
    with torch.no_grad():
        return pipe.unet(x, t, encoder_hidden_states=emb).sample


def test_concept_runs_are_views_within_each_copy():
    assert concept_runs([0, 0, 1, -1, 1], 5) == [(0, 0, 2), (1, 2, 3), (1, 4, 5)]
    # two copies of the batch (CFG): a run never spans the copies
    assert concept_runs([1, 1], 4) == [(1, 0, 2), (1, 2, 4)]
    with pytest.raises(RuntimeError):
        concept_runs([0, 1, 1], 4)


def test_mixed_batch_equals_each_concept_alone(two_locon):
    pipe, probs = two_locon
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=gen)
    emb = torch.randn(4, 77, pipe.unet.config.cross_attention_dim, generator=gen)
    t = torch.tensor(500)
    w0 = {p.key: getattr(pipe, p.component).get_submodule(p.path).weight.detach().clone() for p in probs}
    base_out = _unet(pipe, x, t, emb)
    weights = ConceptWeights(pipe, probs)
    alone = []
    for c in (0, 1):
        weights.set(c)
        alone.append(_unet(pipe, x, t, emb))
    owners = [1, 0, 0, 1]
    weights.set(owners)
    mixed = _unet(pipe, x, t, emb)
    weights.restore()
    for b, c in enumerate(owners):
        torch.testing.assert_close(mixed[b], alone[c][b], rtol=1e-4, atol=1e-5)
    assert float((alone[0] - base_out).abs().max()) > 1e-3  # the deltas change the output
    for p in probs:  # restored, no hook left
        assert torch.equal(getattr(pipe, p.component).get_submodule(p.path).weight, w0[p.key])
    torch.testing.assert_close(_unet(pipe, x, t, emb), base_out, rtol=0, atol=0)


def test_mixed_batch_statistics_equal_one_pass_per_concept(two_locon):
    pipe, probs = two_locon
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=gen)
    emb = torch.randn(4, 77, pipe.unet.config.cross_attention_dim, generator=gen)
    t = torch.tensor(300)
    layers = {p.key: (p.path, p.downs) for p in probs}
    weights = ConceptWeights(pipe, probs)
    one = GramCollector(pipe.unet, layers)
    with one:
        for c, rows in ((0, [1, 2]), (1, [0, 3])):
            weights.set(c)
            one.concept = c
            _unet(pipe, x[rows], t, emb[rows])
    shared = GramCollector(pipe.unet, layers)
    with shared:
        owners = [1, 0, 0, 1]
        weights.set(owners)
        shared.owners = owners
        _unet(pipe, x, t, emb)
    weights.restore()
    # float32 forward passes: W0 x + U (D x) and (W0 + U D) x round differently (~1e-6 of the largest entry)
    for key, st in one.stats.items():
        other = shared.stats[key]
        assert float(other.tokens) == float(st.tokens) > 0
        torch.testing.assert_close(other.G, st.G, rtol=1e-4, atol=1e-5 * float(st.G.abs().max()))
        for c in st.P:
            torch.testing.assert_close(other.P[c], st.P[c], rtol=1e-4, atol=1e-5 * float(st.P[c].abs().max()) + 1e-12)
