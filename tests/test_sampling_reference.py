"""Switch, Composite, Merge and CMLoRA against independent re-implementations on plain diffusers.

Each reference below is written from the official code's behaviour (Multi-LoRA-Composition's pipeline and
switch callback; the CMLoRA authors' offline pipeline), with diffusers' own mechanisms: ``set_adapters`` with
weight 1 and the LoRA scale passed as ``cross_attention_kwargs={"scale": s}``, the pipeline's own
``encode_prompt``, a step-end callback for Switch, and for CMLoRA's cache a forward hook that replaces the output
of the second-to-last up block by the cached input of the last one (the official DeepCache split at layer 0,
block 1). lorakit's final latents must match within 1e-4 at the same seed.
"""

import copy

import numpy as np
import pytest
import torch

from lorakit.adapters.io import save_adapter
from lorakit.sampling import SamplerSettings, generate, load_adapters
from lorakit.sampling import schedules
from lorakit.testing import random_adapter

SCALE = 0.8  # the reference's LoRA scale
PROMPT, NEG = "a red cat", "blurry"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sd1_pipe):
    root = tmp_path_factory.mktemp("ref_adapters")
    files = [save_adapter(random_adapter(sd1_pipe, seed=20 + k, text_encoder=True, std=0.3), root / f"r{k}.safetensors")
             for k in range(3)]
    pipe = copy.deepcopy(sd1_pipe)
    pipe.set_progress_bar_config(disable=True)
    ads = load_adapters(pipe, files, weights=[SCALE] * 3)
    return pipe, ads


def _ours(pipe, ads, seed=3, **kw):
    st = SamplerSettings(**{"steps": 8, "cfg": 5.0, **kw})
    return generate(pipe, ads, st, PROMPT, NEG, [seed], output_type="latent")


def _encode_all(pipe, names):
    pipe.set_adapters(names)  # weight 1 each; the scale comes from cross_attention_kwargs, as in the reference
    pos, neg = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEG, lora_scale=SCALE)
    return torch.cat([neg, pos])


def _start(pipe, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    pipe.scheduler.set_timesteps(steps)
    latents = pipe.prepare_latents(1, 4, 32, 32, torch.float32, torch.device("cpu"), [gen])
    return latents, pipe.prepare_extra_step_kwargs([gen], 0.0)


def test_merge_matches_pipeline(setup):
    pipe, ads = setup
    ours, _ = _ours(pipe, ads, method="merge")
    pipe.set_adapters([a.name for a in ads])
    ref = pipe(PROMPT, negative_prompt=NEG, num_inference_steps=8, guidance_scale=5.0, output_type="latent",
               generator=[torch.Generator().manual_seed(3)], cross_attention_kwargs={"scale": SCALE}).images
    assert (ours - ref).abs().max() < 1e-4


def test_switch_matches_reference_callback(setup):
    pipe, ads = setup
    names = [a.name for a in ads[:2]]

    def callback(p, i, t, kwargs):  # the reference: switch after step i when i > 0 and i % every == 0
        if i > 0 and i % 3 == 0:
            current = next(k for k, n in enumerate(names) if n in p.get_active_adapters())
            p.set_adapters(names[(current + 1) % len(names)])
        return {}

    pipe.set_adapters([names[0]])
    ref = pipe(PROMPT, negative_prompt=NEG, num_inference_steps=10, guidance_scale=5.0, output_type="latent",
               generator=[torch.Generator().manual_seed(3)], cross_attention_kwargs={"scale": SCALE},
               callback_on_step_end=callback).images
    ours, info = _ours(pipe, ads[:2], method="switch", steps=10, switch_every=3)
    assert info["active_per_step"] == [names[0]] * 4 + [names[1]] * 3 + [names[0]] * 3
    assert (ours - ref).abs().max() < 1e-4
    assert schedules.switch_schedule(20, 2, 5) == [0] * 6 + [1] * 5 + [0] * 5 + [1] * 4


def _reference_composite(pipe, ads, steps, cfg, seed, weights=None, cache_plan=None, order=None, layer=0):
    """The reference's lora_composite loop; with ``weights`` [step][pos] CMLoRA's weighting, with ``cache_plan``
    [step][pos] (True = cache cleared) its per-LoRA deep-feature cache; ``layer`` k > 0 caches the output of the
    last up block's layer k - 1 instead of the block's input (lorakit mode's finer split)."""
    names = [a.name for a in ads]
    order = order or list(range(len(ads)))
    text = _encode_all(pipe, names)
    latents, extra = _start(pipe, steps, seed)
    up_last, up_prev = pipe.unet.up_blocks[-1], pipe.unet.up_blocks[-2]
    if layer:  # the module whose output is the input of layer k (its cross-attention if it has one)
        up_prev = (up_last.attentions if hasattr(up_last, "attentions") else up_last.resnets)[layer - 1]
    cached = [None] * len(ads)
    with torch.no_grad():
        for i, t in enumerate(pipe.scheduler.timesteps):
            x = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            preds = []
            for pos, a in enumerate(order):
                pipe.set_adapters(names[a])
                if cache_plan is not None and cache_plan[i][pos]:
                    cached[pos] = None
                grab = {}

                def keep_input(module, args, kwargs):
                    grab["f"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

                def keep_output(module, args, out):
                    grab["f"] = out[0] if isinstance(out, tuple) else out

                hooks = [up_prev.register_forward_hook(keep_output) if layer else
                         up_last.register_forward_pre_hook(keep_input, with_kwargs=True)]
                if cache_plan is not None and cached[pos] is not None:
                    feature = cached[pos]
                    hooks.append(up_prev.register_forward_hook(
                        lambda m, args, out: (feature, *out[1:]) if isinstance(out, tuple) else feature))
                eps = pipe.unet(x, t, encoder_hidden_states=text, cross_attention_kwargs={"scale": SCALE}).sample
                for h in hooks:
                    h.remove()
                if cache_plan is not None and cached[pos] is None:
                    cached[pos] = grab["f"]
                preds.append(eps * (weights[i][pos] * len(ads) if weights is not None else 1.0))
            u, c = torch.stack(preds).chunk(2, dim=1)
            u, c = u.mean(0), c.mean(0)
            latents = pipe.scheduler.step(u + cfg * (c - u), t, latents, **extra).prev_sample
    return latents


@pytest.mark.slow  # 17-25 s wall on the loaded CI machine; merge and switch stay in the fast tests
def test_composite_matches_reference(setup):
    pipe, ads = setup
    ours, info = _ours(pipe, ads, method="composite")
    ref = _reference_composite(pipe, ads, 8, 5.0, 3)
    assert (ours - ref).abs().max() < 1e-4
    per, _ = _ours(pipe, ads, method="composite", encode="per-adapter")
    assert (per - ref).abs().max() > 1e-3  # text-encoder LoRAs: encoding per adapter is another result


def _official_indicator_plan(steps, n, n_real, interval, late_after, fixed=False, round_rule=False):
    """The official offline pipeline's rotation, written out literally: returns (weights, cleared) per step.

    ``fixed``: the late-phase refresh hits the newly dominant LoRA (not a copy of the list) and the late phase
    starts at ``late_after``; ``round_rule``: LoRAs outside the rotation are also cleared when a round starts."""
    seq = set(schedules.cmlora_interval_steps(steps, interval))
    coeff = n - 0.5
    other = n / (coeff + n - 1)
    dom_w = other * coeff
    indicator, weights, cleared = 0, [], []
    for i in range(steps):
        clear = [False] * n
        if i in seq:
            if n_real == n or i <= late_after:
                clear[indicator % n_real] = True
            elif fixed:
                clear[1 + indicator % n_real] = True  # the list itself, not a slice copy as in the official code
            if round_rule and indicator % n_real == 0:
                keep = range(1, n_real + 1) if (n_real < n and i > late_after) else range(n_real)
                clear = [c or p not in keep for p, c in enumerate(clear)]
            indicator += 1
        if n_real == n or i <= late_after:
            dom = (indicator - 1) % n_real
        else:
            dom = (indicator - 1) % n_real + 1
        weights.append([(dom_w if p == dom else other) / n for p in range(n)])
        cleared.append([c or i == 0 for c in clear])
    return weights, cleared


@pytest.mark.parametrize("interval", [0, 2, 5])
def test_cmlora_official_plan_at_220_steps(interval):
    order = [2, 0, 1, 3]
    plan = schedules.cmlora_plan(220, order, 3, interval, mode="official", cache=interval >= 2)
    weights, cleared = _official_indicator_plan(220, 4, 3, interval, 120)
    assert np.allclose(plan.weights, weights)
    if interval >= 2:
        assert [[bool(v) for v in row] for row in plan.full] == cleared
        assert not any(any(row) for row in plan.full[121:])  # the official bug: nothing refreshed after step 120
        assert [row[3] for row in plan.full].count(True) == 1  # the background: only at step 0
    fixed = schedules.cmlora_plan(220, order, 3, interval, mode="lorakit", cache=True, refresh="dominant")
    fw, fc = _official_indicator_plan(220, 4, 3, interval, 220 * 120 / 220, fixed=True)
    assert np.allclose(fixed.weights, fw) and [[bool(v) for v in r] for r in fixed.full] == fc
    assert schedules.official_weights(2) == pytest.approx((0.6, 0.4))
    assert len(schedules.cmlora_interval_steps(20, 0)) == 10


@pytest.mark.slow  # 17-25 s wall on the loaded CI machine
def test_cmlora_official_mode_matches_reference(setup, monkeypatch):
    pipe, ads = setup
    monkeypatch.setattr(schedules, "OFFICIAL_LATE_AFTER", 5)  # the official 120, scaled down to a short test
    order = [2, 0, 1]  # e.g. kinds [style, background, character] -> character, style, then the background
    weights, cleared = _official_indicator_plan(11, 3, 2, 2, 5)
    ref = _reference_composite(pipe, ads, 11, 5.0, 3, weights=weights, cache_plan=cleared, order=order)
    ours, info = generate(pipe, ads, SamplerSettings(method="cmlora", steps=11, cfg=5.0, cmlora_mode="official",
                                                     cmlora_interval=2), PROMPT, NEG, [3], order=order, n_rotation=2,
                          output_type="latent")
    assert info["cache"] and info["passes"]["shallow"] > 0
    assert (ours - ref).abs().max() < 1e-4


@pytest.mark.slow  # 17-25 s wall on the loaded CI machine
def test_cmlora_lorakit_mode_matches_reference(setup):
    pipe, ads = setup
    order, steps = [2, 0, 1], 11
    weights, cleared = _official_indicator_plan(steps, 3, 2, 0, steps * 120 / 220, fixed=True, round_rule=True)
    ref = _reference_composite(pipe, ads, steps, 5.0, 3, weights=weights, cache_plan=cleared, order=order, layer=1)
    ours, info = generate(pipe, ads, SamplerSettings(method="cmlora", steps=steps, cfg=5.0), PROMPT, NEG, [3],
                          order=order, n_rotation=2, output_type="latent")
    full_bg = info["passes"]["per_adapter"][ads[1].name]["full_steps"]
    assert len(full_bg) > 1 and max(full_bg) > steps // 2  # the background's cache is refreshed, also late
    assert info["cache_split"] == [1, 1]  # lorakit mode's default: one layer more cached than the official split
    assert (ours - ref).abs().max() < 1e-4
    # the official split in lorakit mode (--cache-layer 0) against the reference's own split
    ref0 = _reference_composite(pipe, ads, steps, 5.0, 3, weights=weights, cache_plan=cleared, order=order)
    ours0, _ = generate(pipe, ads, SamplerSettings(method="cmlora", steps=steps, cfg=5.0, cache_layer=0), PROMPT, NEG,
                        [3], order=order, n_rotation=2, output_type="latent")
    assert (ours0 - ref0).abs().max() < 1e-4 and (ours0 - ours).abs().max() > 1e-4
