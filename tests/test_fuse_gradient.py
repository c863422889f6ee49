"""Gradient fusion in closed form: exactness, optimality against the reference's LBFGS, and usefulness."""

import copy
import json

import pytest
import torch

from lorakit.adapters.io import live_path, save_adapter
from lorakit.fusion import concept_prompts
from lorakit.fusion.gradient import Concept, GradientSettings, fuse_gradient, stage_of
from lorakit.fusion.merge import apply_deltas, weighted
from lorakit.testing import random_adapter

from lbfgs_fusion_reference import REFERENCE_ITERS, layer_data, lbfgs_solve, mse_objective

# A fixed tiny ridge: these tests check the exact least-squares solve (ridge="auto" has its own tests).
SETTINGS = dict(steps=2, resolution=16, progress=False, keep_inputs=True, seed=0, ridge=1e-6, ridge_target="base")
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
        out.append(Concept(f"c{i}", ad, w, prompts, samples, trigger=ad.metadata.get("lorakit.trigger")))
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
        # up to float noise relative to the problem's scale (the to_k/to_v layers fit their few rows exactly)
        assert f_closed <= f_lbfgs * (1 + 1e-7) + 1e-6 * mse_objective(w0f, X, Y), (key, f_closed, f_lbfgs)
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


@pytest.fixture(scope="module")
def fused_auto(sd1_pipe):
    """The default ridge (chosen per layer on held-out prompts and seeds, toward the average), to_k/to_v on the
    reference's rows (trigger tokens + end token)."""
    from lorakit.fusion import heldout_prompts

    pipe = copy.deepcopy(sd1_pipe)
    adapters = _text_side_adapters(pipe)
    concepts = _concepts(adapters, [1.0, 1.0])
    for c, ad, t in zip(concepts, adapters, TRIGGERS):
        c.trigger, c.val_prompts = t, heldout_prompts(ad, None, False)
        c.val_sample_prompts = list(c.val_prompts)
    settings = GradientSettings(**{**SETTINGS, "ridge": "auto", "ridge_target": "average", "kv_rows": "concept"})
    return pipe, adapters, fuse_gradient(pipe, concepts, settings)


def test_fused_model_closer_to_each_concept_than_weighted_average_on_new_prompts(sd1_pipe, fused_auto):
    pipe, adapters, out = fused_auto
    avg = copy.deepcopy(sd1_pipe)
    apply_deltas(avg, weighted(adapters))
    d_fused = d_avg = 0.0
    for ad, trigger in zip(adapters, TRIGGERS):
        own = copy.deepcopy(sd1_pipe)
        apply_deltas(own, ad.modules)
        # the fit prompt, and two prompts never used in the fusion (neither fitted nor held out)
        for prompt in (f"photo of a {trigger}", f"a {trigger} on a table", f"{trigger} in the snow"):
            ref = _eps(own, prompt)
            d_fused += float((_eps(pipe, prompt) - ref).norm())
            d_avg += float((_eps(avg, prompt) - ref).norm())
    # measured: 0.81x here (0.83x with the ridge toward W0); the old recipe (padded to_k/to_v rows, ridge 1e-6)
    # was about 2x worse than the average on a similar prompt set
    assert d_fused < 0.95 * d_avg, (d_fused, d_avg)


def test_auto_ridge_is_the_heldout_best_and_scored_on_raw_heldout_activations(sd1_pipe, fused_auto):
    pipe, adapters, out = fused_auto
    from lorakit.fusion.gradient import RIDGE_GRID, solve_layer

    checked = {}
    for key, rep in out["layers"].items():
        stage = stage_of(key)
        assert rep["ridge_source"] == "held-out" and rep["heldout_tokens"] > 0
        grid = rep["heldout_grid"]
        assert len(grid) == len(RIDGE_GRID) and rep["heldout_residual"] == min(v for v in grid.values())
        if checked.get(stage, 0) >= 2:
            continue
        # the fit-only solution at the chosen ridge, scored on the raw held-out inputs, gives the reported number
        prob = out["problems"][key]
        coll, vcoll = (out["stages"][stage][k][prob.component] for k in ("collectors", "val_collectors"))
        st, vst = coll.stats[key], vcoll.stats[key]
        ridge = float(rep["ridge"])
        sol = solve_layer(st.G, st.P, prob, 2, ridge if ridge != float("inf") else 1e300, ridge_target="average")
        w0 = _weight(sd1_pipe, key).reshape(prob.shape[0], -1).double()
        Xv, Yv = layer_data(vst, prob, w0)
        W = w0 + sol.up @ sol.down
        held = float(((Xv @ W.T - Yv) ** 2).sum()) / float(((Xv @ w0.T - Yv) ** 2).sum())
        assert rep["heldout_residual"] == pytest.approx(held, rel=1e-4, abs=1e-9), key
        checked[stage] = checked.get(stage, 0) + 1
    assert set(checked) == {"text_encoder", "cross_kv", "unet"}
    ridges = {rep["ridge"] for rep in out["layers"].values()}
    assert len(ridges) > 2  # chosen per layer, not one value for all


def test_kv_stage_fits_concept_and_end_rows_only(sd1_pipe, fused_auto):
    from lorakit.fusion.capture import token_rows

    pipe, adapters, out = fused_auto
    tok = sd1_pipe.tokenizer
    n_trigger = [len(tok(t, add_special_tokens=False).input_ids) for t in TRIGGERS]
    # 2 fit prompts per concept, each: the trigger's tokens + the end token
    want = sum(2 * (n + 1) for n in n_trigger)
    kv = [r for k, r in out["layers"].items() if stage_of(k) == "cross_kv"]
    assert kv and all(r["tokens"] == want for r in kv)
    # the held-out statistics that choose the ridge: every token of the held-out prompts, never padding
    from lorakit.fusion import HELDOUT_TEMPLATES

    n_val = sum(len(tok(h.format(t)).input_ids) for t in TRIGGERS for h in HELDOUT_TEMPLATES)
    assert all(r["heldout_tokens"] == n_val for r in kv)
    rows = token_rows(tok, ["photo of a red circle", "blue square"], "concept", trigger="red circle")
    ids = tok(["photo of a red circle"], padding="max_length", max_length=77).input_ids[0]
    assert rows.shape == (2, 77) and rows[0].sum() == n_trigger[0] + 1 and rows[1].sum() == 1  # no trigger: end only
    assert rows[0, ids.index(tok.eos_token_id)] and not rows[0, ids.index(tok.eos_token_id) + 1 :].any()
    prompt_rows = token_rows(tok, ["photo of a red circle"], "prompt")
    assert prompt_rows.sum() == ids.index(tok.eos_token_id) + 1  # start .. end token, no padding
    te = [r for k, r in out["layers"].items() if stage_of(k) == "text_encoder"]
    n_prompt = sum(len(tok(p).input_ids) for t in TRIGGERS for p in (f"photo of a {t}", t))
    assert all(r["tokens"] == n_prompt for r in te)


def test_batched_capture_equals_one_pass_per_prompt(sd1_pipe):
    from lorakit.fusion.gradient import build_problems, run_stage, work_items

    stats = []
    for batch in (1, 8):
        pipe = copy.deepcopy(sd1_pipe)
        adapters = _text_side_adapters(pipe)
        concepts = _concepts(adapters, [1.0, 1.0])
        for c in concepts:
            c.sample_prompts = c.prompts
        settings = GradientSettings(**{**SETTINGS, "samples": 2, "batch": batch})
        probs = build_problems(pipe, concepts)
        items = work_items(concepts, settings, "unet")
        assert len(items) == (8 if batch == 1 else 1)  # both concepts share one pass

        def run_unet(item):
            from lorakit.fusion.gradient import _call_pipe

            _call_pipe(pipe, item.prompts, item.seeds, 2, 16, 1.0)

        probs = {k: p for k, p in probs.items() if k.endswith("attn2.to_q")}
        _, rep = run_stage(pipe, "unet", probs, concepts, settings, items, run_unet, list(probs.values()))
        stats.append({k: s.G for k, s in rep["collectors"]["unet"].stats.items()})
    for key, G in stats[0].items():
        torch.testing.assert_close(stats[1][key], G, rtol=1e-4, atol=1e-6 * float(G.abs().max()))


def test_fit_and_heldout_prompts_share_passes_with_the_same_statistics(sd1_pipe):
    """ridge="auto": a concept's fit and held-out prompts run in the same forward passes; each split's statistics
    (UNet layers: batch rows; text encoder and to_k/to_v: token rows) equal those of one pass per prompt."""
    from lorakit.fusion.gradient import _call_pipe, build_problems, run_stage, work_items
    from lorakit.fusion.capture import token_rows

    stats = []
    for batch in (1, 8):
        pipe = copy.deepcopy(sd1_pipe)
        concepts = _concepts(_text_side_adapters(pipe), [1.0, 1.0])
        for c in concepts:
            c.val_prompts = c.val_sample_prompts = [f"a picture of {c.trigger}"]
        settings = GradientSettings(**{**SETTINGS, "ridge": "auto", "batch": batch})
        probs = build_problems(pipe, concepts)
        unet_items = work_items(concepts, settings, "unet")
        assert [it.split for it in unet_items] == (["fit", "val"] * 2 if batch == 1 else ["mixed"])

        def run_unet(item):
            _call_pipe(pipe, item.prompts, item.seeds, 2, 16, 1.0)

        def run_text(item):
            pipe.encode_prompt(prompt=item.prompts, device="cpu", num_images_per_prompt=1,
                               do_classifier_free_guidance=False)

        def text_rows(item, comp, split):
            return token_rows(pipe.tokenizer, item.prompts, "prompt")

        q = {k: p for k, p in probs.items() if k.endswith("attn2.to_q")}
        te = {k: p for k, p in probs.items() if stage_of(k) == "text_encoder"}
        _, rep_u = run_stage(pipe, "unet", q, concepts, settings, unet_items, run_unet, list(q.values()))
        _, rep_t = run_stage(pipe, "text_encoder", te, concepts, settings, work_items(concepts, settings, "text"),
                             run_text, list(te.values()), rows_for=text_rows)
        stats.append({(split, k): (s.G, s.P, float(s.tokens)) for rep in (rep_u, rep_t)
                      for split, name in (("fit", "collectors"), ("val", "val_collectors"))
                      for coll in rep[name].values() for k, s in coll.stats.items()})
    assert {sp for sp, _ in stats[0]} == {"fit", "val"}
    for key, (G, P, n) in stats[0].items():
        G8, P8, n8 = stats[1][key]
        assert n8 == n > 0, key
        torch.testing.assert_close(G8, G, rtol=1e-4, atol=1e-6 * float(G.abs().max()))
        for i in P:
            torch.testing.assert_close(P8[i], P[i], rtol=1e-4, atol=1e-6 * float(P[i].abs().max()) + 1e-12)


def _conv_keys(out):
    return [k for k, p in out["problems"].items() if p.is_conv]


def test_large_convs_solved_in_the_lora_subspace(sd1_pipe):
    """Convs above max_conv_dim (here every conv: max_conv_dim=0) are solved within the span of the concepts' down
    matrices from an R x R Gram: one concept comes back as its own delta; with two, the fit is at least as good as
    the weighted average (which lies in that subspace) and no better than the full solve on unfolded patches."""
    pipe = copy.deepcopy(sd1_pipe)
    ad = _adapters(pipe)[0]  # LoCon: convs of the upper blocks
    out = fuse_gradient(pipe, _concepts([ad], [0.7]), GradientSettings(**{**SETTINGS, "steps": 1, "max_conv_dim": 0}))
    convs = _conv_keys(out)
    assert len(convs) >= 4 and out["stages"]["unet"]["subspace_layers"] == sorted(convs)
    assert not out["stages"]["unet"]["fallback_layers"]
    for key in convs:
        prob, rep = out["problems"][key], out["layers"][key]
        assert rep["space"].startswith("LoRA subspace") and rep["in_dim"] == prob.in_dim
        G = out["stages"]["unet"]["collectors"]["unet"].stats[key].G
        assert G.shape == (4, 4)  # rank 4: one R x R Gram, not (in*kh*kw)^2
        fused = out["modules"][key].delta().double().reshape(prob.shape[0], -1)
        want = 0.7 * ad.modules[key].delta().double().reshape(fused.shape)
        torch.testing.assert_close(fused, want, rtol=1e-3, atol=1e-6)
        assert rep["residual"] < 1e-4

    runs = {}
    for dim in (0, 10**9):
        p2 = copy.deepcopy(sd1_pipe)
        ads = _adapters(p2)
        b = random_adapter(p2, "upper", network="locon", rank=2, alpha=2.0, seed=3, std=0.15)
        b.metadata["lorakit.trigger"] = TRIGGERS[1]
        runs[dim] = fuse_gradient(p2, _concepts([ads[0], b], [1.0, 1.0]),
                                  GradientSettings(**{**SETTINGS, "steps": 1, "max_conv_dim": dim}))
    convs = _conv_keys(runs[0])
    assert len(convs) >= 4
    for key in convs:
        sub, full = runs[0]["layers"][key], runs[10**9]["layers"][key]
        assert "space" in sub and "space" not in full
        assert sub["residual"] <= sub["weighted_residual"] + 1e-6, (key, sub)
        assert full["residual"] <= sub["residual"] + 1e-6, (key, full, sub)
        assert sub["weighted_residual"] == pytest.approx(full["weighted_residual"], rel=1e-3)
    assert any(sub["residual"] < 0.9 * sub["weighted_residual"] for sub in (runs[0]["layers"][k] for k in convs))


def test_large_convs_average_when_asked(sd1_pipe):
    pipe = copy.deepcopy(sd1_pipe)
    ad = _adapters(pipe)[0]
    settings = GradientSettings(**{**SETTINGS, "steps": 1, "max_conv_dim": 0, "large_convs": "average"})
    with pytest.warns(UserWarning, match="weighted average"):
        out = fuse_gradient(pipe, _concepts([ad], [1.0]), settings)
    convs = _conv_keys(out)
    assert out["stages"]["unet"]["fallback_layers"] == sorted(convs)
    assert all(out["layers"][k]["method"] == "weighted_fallback" for k in convs)


def _fuse_with_poisoned_value(tmp_path, sd1_pipe, capsys, value, name):
    """Save a text-side adapter with one `value` (NaN / inf) in an up matrix and fuse it from the command line:
    (exit status, stderr, the poisoned module's key, the pipeline copy)."""
    from lorakit.cli import main

    pipe = copy.deepcopy(sd1_pipe)
    ad = _text_side_adapters(pipe)[0]
    key = next(iter(ad.modules))
    ad.modules[key].up[0, 0] = value
    path = save_adapter(ad, tmp_path / f"{name}.safetensors")
    rc = main(["fuse", "--method", "gradient", "--base", "tiny:sd1", "--adapters", str(path), "--out",
               str(tmp_path / f"out_{name}"), "--quiet"])
    return rc, capsys.readouterr().err, key, pipe


def test_nan_adapter_and_singular_system_are_clear_errors(tmp_path, sd1_pipe, capsys):
    from lorakit.fusion.gradient import build_problems, solve_layer

    rc, err, key, pipe = _fuse_with_poisoned_value(tmp_path, sd1_pipe, capsys, float("nan"), "broken")
    assert rc == 2 and "broken" in err and key in err and "NaN" in err and "Traceback" not in err, (rc, err)
    assert len(err.strip().splitlines()) == 1, err
    ok = _text_side_adapters(pipe)[1]
    prob = next(iter(build_problems(pipe, _concepts([ok], [1.0])).values()))
    n = prob.in_dim
    x = torch.randn(3, n, dtype=torch.float64)  # 3 rows: G has rank 3 < n
    G, P = x.T @ x, {0: prob.downs[0] @ (x.T @ x)}
    with pytest.raises(ValueError, match=f"{prob.key}.*singular"):
        solve_layer(G, P, prob, 1, 0.0)
    with pytest.raises(ValueError, match=f"{prob.key}.*NaN"):
        solve_layer(G * float("nan"), P, prob, 1, "auto")
    assert solve_layer(G, P, prob, 1, "auto").report["ridge_source"] == "no held-out data"


def test_inf_adapter_and_singular_system_from_the_command_line_exit_2(tmp_path, sd1_pipe, capsys):
    from lorakit.cli import main

    # an inf too; and a singular system from the command line (no ridge, fewer token rows than inputs)
    rc, err, key, pipe = _fuse_with_poisoned_value(tmp_path, sd1_pipe, capsys, float("inf"), "broken_inf")
    assert rc == 2 and "broken_inf" in err and key in err and "inf" in err and "Traceback" not in err, (rc, err)
    good = save_adapter(_text_side_adapters(pipe)[1], tmp_path / "good.safetensors")
    rc = main(["fuse", "--method", "gradient", "--base", "tiny:sd1", "--adapters", str(good), "--out",
               str(tmp_path / "o3"), "--ridge", "0", "--steps", "1", "--resolution", "16", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "singular" in err and "layer text_encoder." in err and "Traceback" not in err, (rc, err)
    assert len(err.strip().splitlines()) == 1, err


def test_fuse_cli_gradient_pipeline_matches_library(tmp_path, sd1_pipe, fused_two):
    from lorakit.cli import main
    from lorakit.models import load_base

    pipe, adapters, out = fused_two
    paths = [str(save_adapter(ad, tmp_path / f"c{i}.safetensors")) for i, ad in enumerate(adapters)]
    dest = tmp_path / "fused"
    rc = main(["fuse", "--method", "gradient", "--base", "tiny:sd1", "--adapters", *paths, "--out", str(dest),
               "--steps", "2", "--resolution", "16", "--quiet", "--ridge", "1e-6",
               "--ridge-target", "base"])
    assert rc == 0
    report = json.loads((dest / "lorakit_fusion.json").read_text())
    assert report["method"] == "gradient" and report["settings"]["steps"] == 2
    assert [x["prompts"] for x in report["inputs"]] == [[f"photo of a {t}", t] for t in TRIGGERS]
    assert [x["val_prompts"] for x in report["inputs"]] == [[f"a picture of {t}", f"{t}, high quality"]
                                                            for t in TRIGGERS]
    assert set(report["layers"]) == set(out["layers"]) and report["time_s"] > 0
    assert all(r["method"] == "closed_form" for r in report["layers"].values())
    kv = [r for k, r in report["layers"].items() if stage_of(k) == "cross_kv"]
    assert kv and all(r["tokens"] == 2 * 2 * 77 for r in kv)  # default --kv-rows all: 2 concepts x 2 prompts x 77
    saved = load_base(dest)
    for key in list(out["modules"])[::7]:
        torch.testing.assert_close(_weight(saved, key), _weight(pipe, key), rtol=1e-5, atol=1e-6)


def test_capture_steps_default_to_10_and_follow_the_flag():
    from dataclasses import replace

    from lorakit.fusion.gradient import settings_from
    from lorakit.fusion.settings import GradientOptions

    assert settings_from(GradientOptions(), seed=0).steps == 10  # the reference samples 20 (docs/fusion.md)
    assert settings_from(replace(GradientOptions(), steps=3), seed=0).steps == 3
