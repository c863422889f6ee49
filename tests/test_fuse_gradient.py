"""Gradient fusion in closed form: exactness, optimality against the reference's LBFGS, and usefulness."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from lorakit.adapters.io import live_path, save_adapter
from lorakit.fusion import concept_prompts
from lorakit.fusion.gradient import Concept, GradientSettings, fuse_gradient, stage_of
from lorakit.fusion.merge import apply_deltas, weighted
from lorakit.testing import random_adapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from lbfgs_fusion_reference import REFERENCE_ITERS, layer_data, lbfgs_solve, mse_objective  # noqa: E402

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny float64 matmuls run faster on one thread (and do not spin against other jobs on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SETTINGS = dict(steps=2, resolution=16, progress=False, keep_inputs=True, seed=0)
TRIGGERS = ["red circle", "blue square"]


def _adapters(pipe):
    """Concept A: LoCon on the upper blocks + text encoder; concept B: LoRA on every attention layer + text encoder."""
    a = random_adapter(pipe, "upper", network="locon", text_encoder=True, rank=4, alpha=4.0, seed=1, std=0.15)
    b = random_adapter(pipe, network="lora", text_encoder=True, rank=2, alpha=2.0, seed=2, std=0.15)
    for ad, t in zip((a, b), TRIGGERS):
        ad.metadata["lorakit.trigger"] = t
    return [a, b]


def _text_side_adapters(pipe):
    """Two concepts with LoRA on the text encoder and every cross-attention layer (where the prompt, hence the
    concept, is visible to the layers), as ED-LoRA / Custom-Diffusion style concept adapters."""
    out = []
    for seed, rank, t in ((1, 4, TRIGGERS[0]), (2, 2, TRIGGERS[1])):
        ad = random_adapter(pipe, network="lora", text_encoder=True, rank=rank, alpha=float(rank), seed=seed, std=0.1)
        ad.modules = {k: m for k, m in ad.modules.items() if k.startswith("text_encoder") or ".attn2." in k}
        ad.metadata["lorakit.trigger"] = t
        out.append(ad)
    return out


def _concepts(adapters, weights):
    out = []
    for i, (ad, w) in enumerate(zip(adapters, weights)):
        prompts, samples, _ = concept_prompts(ad, f"c{i}", None)
        out.append(Concept(f"c{i}", ad, w, prompts, samples))
    return out


def _weight(pipe, key):
    comp, path = key.split(".", 1)
    model = getattr(pipe, comp)
    return model.get_submodule(live_path(model, path)).weight.detach()


@pytest.fixture(scope="module")
def fused_two(sd1_pipe):
    pipe = copy.deepcopy(sd1_pipe)
    adapters = _text_side_adapters(pipe)
    out = fuse_gradient(pipe, _concepts(adapters, [1.0, 1.0]), GradientSettings(**SETTINGS))
    return pipe, adapters, out


def test_one_concept_gives_its_own_weights(sd1_pipe):
    pipe = copy.deepcopy(sd1_pipe)
    ad = _adapters(pipe)[0]
    a = 0.7
    out = fuse_gradient(pipe, _concepts([ad], [a]), GradientSettings(**{**SETTINGS, "steps": 1}))
    assert set(out["modules"]) == set(ad.modules)
    stages = {stage_of(k) for k in ad.modules}
    assert stages == {"text_encoder", "cross_kv", "unet"}
    full_rank = 0
    for key, mod in ad.modules.items():
        prob = out["problems"][key]
        coll = out["stages"][stage_of(key)]["collectors"][prob.component]
        G = coll.stats[key].G
        fused = out["modules"][key].delta().double().reshape(mod.up.shape[0], -1)
        want = a * mod.delta().double().reshape(fused.shape)
        rep = out["layers"][key]
        assert rep["residual"] < 1e-4, (key, rep)
        evals, evecs = torch.linalg.eigh(G)
        # in G's eigenbasis: each direction gets the concept's delta shrunk by s / (s + lambda): exactly
        # W0 + a dW on the inputs the layer saw (s >> lambda), W0 on directions it never saw (s = 0)
        shrink = evals.clamp(min=0) / (evals.clamp(min=0) + rep["ridge_lambda"])
        torch.testing.assert_close(fused @ evecs, (want @ evecs) * shrink, rtol=1e-4, atol=1e-7)
        if evals.min() > 1e4 * rep["ridge_lambda"]:
            full_rank += 1
            torch.testing.assert_close(fused, want, rtol=1e-3, atol=1e-6)
        # the pipeline now holds W0 + fused delta
        w0 = _weight(sd1_pipe, key).double().reshape(fused.shape)
        torch.testing.assert_close(_weight(pipe, key).double().reshape(fused.shape), w0 + fused, rtol=1e-5, atol=1e-6)
    assert full_rank >= 3  # the weight-equality check above is not vacuous


def test_closed_form_objective_not_worse_than_lbfgs(sd1_pipe, fused_two):
    pipe, adapters, out = fused_two
    checked = {}
    for key, prob in out["problems"].items():
        stage = stage_of(key)
        if len(prob.ups) < 2 or checked.get(stage, 0) >= 3:
            continue
        st = out["stages"][stage]["collectors"][prob.component].stats[key]
        w0 = _weight(sd1_pipe, key)
        X, Y = layer_data(st, prob, w0)
        w0f = w0.reshape(w0.shape[0], -1)
        closed = _weight(pipe, key).reshape(w0f.shape)  # what the fused model stores
        lbfgs = lbfgs_solve(X, Y, w0f, REFERENCE_ITERS[stage])
        f_closed, f_lbfgs = mse_objective(closed, X, Y), mse_objective(lbfgs, X, Y)
        assert f_closed <= f_lbfgs * (1 + 1e-7) + 1e-14, (key, f_closed, f_lbfgs)
        # and the statistics-only objective the report uses agrees with the one on raw activations
        dW = [(prob.ups[i] @ prob.downs[i]) for i in sorted(prob.ups)]
        K = sum(float(((torch.cat(st.inputs[i]) @ d.T) ** 2).sum()) for i, d in zip(sorted(prob.ups), dW))
        n = X.shape[0] * w0f.shape[0]
        assert out["layers"][key]["residual"] == pytest.approx(f_closed * n / K, rel=1e-3, abs=1e-9)
        checked[stage] = checked.get(stage, 0) + 1
    assert checked == {"text_encoder": 3, "cross_kv": 3, "unet": 3}


def _eps(pipe, prompt):
    from lorakit.testing import unet_inputs

    emb, _ = pipe.encode_prompt(prompt=prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    inp = unet_inputs(pipe, batch=1, seed=5)
    inp["encoder_hidden_states"] = emb
    inp["sample"] = inp["sample"][:, :, :8, :8]  # 16 px, the fusion's sampling size
    with torch.no_grad():
        return pipe.unet(**inp).sample


def test_fused_model_closer_to_each_concept_than_weighted_average(sd1_pipe, fused_two):
    pipe, adapters, out = fused_two
    avg = copy.deepcopy(sd1_pipe)
    apply_deltas(avg, weighted(adapters))
    for ad, trigger in zip(adapters, TRIGGERS):
        own = copy.deepcopy(sd1_pipe)
        apply_deltas(own, ad.modules)
        prompt = f"photo of a {trigger}"
        ref = _eps(own, prompt)
        d_fused = (_eps(pipe, prompt) - ref).norm()
        d_avg = (_eps(avg, prompt) - ref).norm()
        assert d_fused < 0.8 * d_avg, (trigger, float(d_fused), float(d_avg))
    summary_res = [r["residual"] for r in out["layers"].values()]
    summary_w = [r["weighted_residual"] for r in out["layers"].values()]
    assert sum(summary_res) < sum(summary_w)  # per-layer objective: better than the weighted average in total
    assert all(r <= w + 1e-9 for r, w in zip(summary_res, summary_w))


def test_fuse_cli_gradient_pipeline_matches_library(tmp_path, sd1_pipe, fused_two):
    from lorakit.cli import main
    from lorakit.models import load_base

    pipe, adapters, out = fused_two
    paths = [str(save_adapter(ad, tmp_path / f"c{i}.safetensors")) for i, ad in enumerate(adapters)]
    dest = tmp_path / "fused"
    rc = main(["fuse", "--method", "gradient", "--base", "tiny:sd1", "--adapters", *paths, "--out", str(dest),
               "--steps", "2", "--resolution", "16", "--quiet"])
    assert rc == 0
    report = json.loads((dest / "lorakit_fusion.json").read_text())
    assert report["method"] == "gradient" and report["settings"]["steps"] == 2
    assert [x["prompts"] for x in report["inputs"]] == [[f"photo of a {t}", t] for t in TRIGGERS]
    assert set(report["layers"]) == set(out["layers"]) and report["time_s"] > 0
    assert all(r["method"] == "closed_form" for r in report["layers"].values())
    saved = load_base(dest)
    for key in list(out["modules"])[::7]:
        torch.testing.assert_close(_weight(saved, key), _weight(pipe, key), rtol=1e-5, atol=1e-6)
