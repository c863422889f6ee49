"""lorakit.sampling: split UNet, merge/switch/composite/cmlora equalities, cache schedule, regions, profiles."""

import copy

import numpy as np
import pytest
import torch

from lorakit.adapters.io import save_adapter
from lorakit.sampling import SamplerSettings, cmlora_plan, generate, load_adapters
from lorakit.sampling.cache import unet_split_forward
from lorakit.sampling.composer import UNetAdapterSwitch, decode_latents, encode
from lorakit.sampling.frequency import high_frequency_score, order_by_frequency, radial_profile
from lorakit.sampling.regional import RegionSpec, Region, parse_regions
from lorakit.testing import random_adapter, unet_inputs


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory, sd1_pipe, sdxl_pipe):
    root = tmp_path_factory.mktemp("adapters")
    files = {}
    for arch, pipe in (("sd1", sd1_pipe), ("sdxl", sdxl_pipe)):
        files[arch] = [
            save_adapter(random_adapter(pipe, seed=k, text_encoder=True, std=0.2), root / f"{arch}_{k}.safetensors")
            for k in range(3)
        ]
    return files


def _arr(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_split_forward_equals_unet(arch, sd1_pipe, sdxl_pipe):
    pipe = sd1_pipe if arch == "sd1" else sdxl_pipe
    inp = unet_inputs(pipe, batch=2, seed=3)
    with torch.no_grad():
        ref = pipe.unet(**inp).sample
    n_up = len(pipe.unet.up_blocks)
    splits = [(d, k) for d in range(1, len(pipe.unet.down_blocks)) for k in range(len(pipe.unet.up_blocks[n_up - d].resnets))]
    assert len(splits) > len(pipe.unet.down_blocks) - 1  # finer splits inside the up blocks are covered
    for depth, layer in splits:
        kw = {"added_cond_kwargs": inp.get("added_cond_kwargs"), "layer": layer}
        full, deep = unet_split_forward(pipe.unet, inp["sample"], inp["timestep"], inp["encoder_hidden_states"], depth, **kw)
        assert torch.equal(full, ref), (depth, layer)
        shallow, _ = unet_split_forward(
            pipe.unet, inp["sample"], inp["timestep"], inp["encoder_hidden_states"], depth, deep_feature=deep, **kw
        )
        assert torch.equal(shallow, ref), (depth, layer)  # same inputs: the cached deep feature is exact
        moved, _ = unet_split_forward(
            pipe.unet, inp["sample"] + 0.5, inp["timestep"], inp["encoder_hidden_states"], depth, deep_feature=deep, **kw
        )
        assert not torch.equal(moved, ref)  # the shallow path really recomputes
    # the blocks were put back whole
    assert all(len(b.resnets) == len(b.attentions) for b in pipe.unet.up_blocks if hasattr(b, "attentions"))
    assert torch.equal(pipe.unet(**inp).sample, ref)
    with pytest.raises(ValueError, match="cache depth"):
        unet_split_forward(pipe.unet, inp["sample"], inp["timestep"], inp["encoder_hidden_states"], 0)
    with pytest.raises(ValueError, match="cache layer"):
        unet_split_forward(pipe.unet, inp["sample"], inp["timestep"], inp["encoder_hidden_states"], 1, layer=9)


def test_cmlora_plan_rotation_weights_and_refreshes():
    # 4 adapters in pass order, the last a background; 40 steps, the official 2/3/2 interval sequence
    plan = cmlora_plan(40, [2, 0, 1, 3], 3, interval=0, mode="lorakit", cache=True, refresh="round")
    assert plan.rotations[:4] == [0, 2, 4, 6] and all(plan.full[0])
    assert {plan.dominant[s] for s in range(0, 21)} == {0, 1, 2}  # early: the background is never dominant
    assert 3 in plan.dominant[22:] and 0 not in plan.dominant[22:]  # late: it joins, the first leaves
    for s, w in enumerate(plan.weights):
        assert sum(w) == pytest.approx(1.0) and w[plan.dominant[s]] == pytest.approx(3.5 / 6.5)
    for pos in range(4):
        full = [s for s in range(40) if plan.full[s][pos]]
        assert len(full) > 1 and full[-1] >= 20, pos  # every cache, the background's too, refreshed late
    for s in plan.rotations[1:]:
        assert plan.full[s][plan.dominant[s]]  # the newly dominant adapter gets a full pass
    official = cmlora_plan(40, [2, 0, 1, 3], 3, interval=2, mode="official", cache=True)
    assert [row[3] for row in official.full].count(True) == 1  # the official code: background never refreshed
    age = cmlora_plan(40, [0, 1, 2], 3, interval=0, refresh="age", max_age=4)
    for pos in range(3):
        full = [s for s in range(40) if age.full[s][pos]] + [40]
        assert max(b - a for a, b in zip(full, full[1:])) <= 4
    nocache = cmlora_plan(10, [0, 1], 2, cache=False)
    assert all(all(row) for row in nocache.full)
    with pytest.raises(ValueError, match="refresh"):
        cmlora_plan(10, [0, 1], 2, refresh="sometimes")


def test_cache_layer_settings(sd1_pipe):
    unet = sd1_pipe.unet
    assert SamplerSettings(method="cmlora").cmlora_cache_layer(unet) == 1  # lorakit mode: the finer split
    assert SamplerSettings(method="cmlora", cmlora_mode="official").cmlora_cache_layer(unet) == 0  # the official one
    assert SamplerSettings(method="cmlora", cache_layer=2).cmlora_cache_layer(unet) == 2
    with pytest.raises(ValueError, match="cache_layer"):
        SamplerSettings(method="cmlora", cmlora_mode="official", cache_layer=1).check()
    with pytest.raises(ValueError, match="cache_layer"):
        SamplerSettings(method="cmlora", cache_layer=-1).check()
    SamplerSettings(method="cmlora", cmlora_mode="official", cache_layer=0).check()


@pytest.mark.parametrize("arch", ["sd1", pytest.param("sdxl", marks=pytest.mark.slow)])  # sdxl: 16 s wall under load
def test_composite_of_copies_equals_single_adapter(arch, sd1_pipe, sdxl_pipe, adapter_files):
    pipe = copy.deepcopy(sd1_pipe if arch == "sd1" else sdxl_pipe)
    f = adapter_files[arch][0]
    ads = load_adapters(pipe, [f, f, f])
    single, _ = generate(pipe, ads[:1], SamplerSettings(method="merge", steps=2, cfg=5.0), "a red cat", "", [1])
    # per-adapter encoding: encoded once with all three copies on, the text-encoder LoRA would count three times
    st = SamplerSettings(method="composite", steps=2, cfg=5.0, encode="per-adapter")
    comp, info = generate(pipe, ads, st, "a red cat", "", [1])
    assert info["passes"]["full"] == 6 and info["passes"]["shallow"] == 0
    assert np.abs(_arr(comp) - _arr(single)).max() <= 1


def test_switch_with_one_adapter_equals_merge(sd1_pipe, adapter_files):
    pipe = copy.deepcopy(sd1_pipe)
    ads = load_adapters(pipe, adapter_files["sd1"][:2])
    merged, _ = generate(pipe, ads[:1], SamplerSettings(method="merge", steps=3, cfg=5.0), "a cat", "", [4])
    switched, info = generate(pipe, ads[:1], SamplerSettings(method="switch", steps=3, cfg=5.0, switch_every=1), "a cat", "", [4])
    assert np.array_equal(_arr(merged), _arr(switched))
    two, info = generate(pipe, ads, SamplerSettings(method="switch", steps=4, cfg=5.0, switch_every=1), "a cat", "", [4])
    # the reference switches after step i when i > 0 and i % tau == 0: the first adapter holds tau + 1 steps
    assert info["active_per_step"] == [ads[0].name, ads[0].name, ads[1].name, ads[0].name]
    assert not np.array_equal(_arr(two), _arr(merged))


def _direct_weighted_composite(pipe, ads, steps, cfg, prompt, seed, weights_per_step):
    """Reference: per step, each adapter alone (diffusers set_adapters) gives its CFG pair; weighted sum."""
    gen = [torch.Generator().manual_seed(seed)]
    texts = []
    for a in ads:
        pipe.set_adapters([a.name], [a.weight])
        texts.append(encode(pipe, prompt, "", 1, True)["embeds"])
    sched = pipe.scheduler
    latents = pipe.prepare_latents(1, 4, 32, 32, torch.float32, torch.device("cpu"), gen)
    sched.set_timesteps(steps)
    with torch.no_grad():
        for s, t in enumerate(sched.timesteps):
            x = sched.scale_model_input(torch.cat([latents] * 2), t)
            eps = 0
            for i, a in enumerate(ads):
                pipe.set_adapters([a.name], [a.weight])
                u, c = pipe.unet(x, t, encoder_hidden_states=texts[i]).sample.chunk(2)
                eps = eps + weights_per_step[s][i] * (u + cfg * (c - u))
            latents = sched.step(eps, t, latents).prev_sample
        return decode_latents(pipe, latents)


@pytest.mark.slow  # ~11 s of CPU; the cached cmlora's counts stay fast
def test_cmlora_no_cache_equals_direct_weighted_composite(sd1_pipe, adapter_files):
    pipe = copy.deepcopy(sd1_pipe)
    ads = load_adapters(pipe, adapter_files["sd1"])
    st = SamplerSettings(method="cmlora", steps=4, cfg=4.0, cache=False, cmlora_interval=1, encode="per-adapter")
    order = [2, 0, 1]
    ours, info = generate(pipe, ads, st, "a cat", "", [7], order=order)
    assert info["dominants"] == [ads[d].name for d in (2, 0, 1, 2)]
    assert info["passes"] == {**info["passes"], "full": 12, "shallow": 0}
    plan = cmlora_plan(4, order, 3, interval=1, cache=False)
    weights = [[row[order.index(i)] for i in range(3)] for row in plan.weights]
    ref = _direct_weighted_composite(pipe, ads, 4, 4.0, "a cat", 7, weights)
    assert np.abs(_arr(ours) - _arr(ref)).max() <= 1
    uniform, _ = generate(pipe, ads, SamplerSettings(method="composite", steps=4, cfg=4.0, encode="per-adapter"),
                          "a cat", "", [7])
    assert not np.array_equal(_arr(uniform), _arr(ours))  # the dominant weighting matters


def _direct_terms(pipe, ads, steps, cfg, seed, combine):
    """Reference for the base-using methods: per step the base's and each adapter's (uncond, cond) predictions
    (diffusers ``set_adapters`` / ``disable_lora``, text from the base encoder for the base), combined by
    ``combine(base_pair, adapter_pairs) -> eps``."""
    gen = [torch.Generator().manual_seed(seed)]
    pipe.disable_lora()
    base_text = encode(pipe, "a cat", "", 1, True)["embeds"]
    pipe.enable_lora()
    pipe.set_adapters([a.name for a in ads], [a.weight for a in ads])
    text = encode(pipe, "a cat", "", 1, True)["embeds"]
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    latents = pipe.prepare_latents(1, 4, 32, 32, torch.float32, torch.device("cpu"), gen)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([latents] * 2), t)
            pipe.disable_lora()
            base = pipe.unet(x, t, encoder_hidden_states=base_text).sample.chunk(2)
            pipe.enable_lora()
            pairs = []
            for a in ads:
                pipe.set_adapters([a.name], [a.weight])
                pairs.append(pipe.unet(x, t, encoder_hidden_states=text).sample.chunk(2))
            latents = sched.step(combine(base, pairs, cfg), t, latents).prev_sample
    return latents


@pytest.mark.slow  # ~10 s of CPU (three methods against a step-by-step reference)
def test_uncond_base_and_delta_equal_their_formulas(sd1_pipe, adapter_files):
    pipe = copy.deepcopy(sd1_pipe)
    ads = load_adapters(pipe, adapter_files["sd1"][:2])
    cfg = lambda u, c, g: u + g * (c - u)  # noqa: E731

    def composite_uncond_base(base, pairs, g):
        return cfg(base[0], sum(c for _, c in pairs) / len(pairs), g)

    def delta(base, pairs, g):
        p0 = cfg(*base, g)
        return p0 + sum(cfg(u, c, g) - p0 for u, c in pairs)

    def delta_uncond_base(base, pairs, g):  # the base's CFG plus each adapter's conditional difference
        return cfg(base[0], base[1] + sum(c - base[1] for _, c in pairs), g)

    for method, uncond, combine in (("composite", "base", composite_uncond_base), ("delta", "adapter", delta),
                                    ("delta", "base", delta_uncond_base)):
        st = SamplerSettings(method=method, steps=3, cfg=4.0, uncond=uncond)
        ours, info = generate(pipe, ads, st, "a cat", "", [2], output_type="latent")
        ref = _direct_terms(pipe, ads, 3, 4.0, 2, combine)
        assert (ours - ref).abs().max() < 1e-4, method
    assert info["passes"]["per_adapter"]["base"]["full"] == 3


def test_cache_counts_match_plan(sd1_pipe, adapter_files):
    pipe = copy.deepcopy(sd1_pipe)
    ads = load_adapters(pipe, adapter_files["sd1"])
    steps = 8
    st = SamplerSettings(method="cmlora", steps=steps, cfg=3.0, cache_depth=2, cmlora_interval=0)
    _, info = generate(pipe, ads, st, "a cat", "", [0])
    plan = cmlora_plan(steps, [0, 1, 2], 3, interval=0)
    want_full = sum(sum(row) for row in plan.full)
    assert info["plan"] == [[int(v) for v in row] for row in plan.full]
    assert info["passes"]["full"] == want_full and info["passes"]["shallow"] == 3 * steps - want_full
    assert want_full < 3 * steps
    for i, a in enumerate(ads):
        per = info["passes"]["per_adapter"][a.name]
        assert per["full_steps"] == [s for s in range(steps) if plan.full[s][i]]


@pytest.mark.slow  # 6.9 s of CPU in the fast suite (2026-12-03, one thread, loaded machine)
def test_region_covering_image_equals_plain_prompt(sd1_pipe, sdxl_pipe, adapter_files):
    for arch, pipe0 in (("sd1", sd1_pipe), ("sdxl", sdxl_pipe)):
        pipe = copy.deepcopy(pipe0)
        ads = load_adapters(pipe, adapter_files[arch][:1])
        st = SamplerSettings(method="merge", steps=2, cfg=5.0)
        # SDXL's pooled embedding comes from the global prompt, so there the global prompt is the region's too.
        glob = "a blue dog" if arch == "sd1" else "a red cat"
        spec = RegionSpec(prompt=glob, negative_prompt="", regions=[Region((0.0, 0.0, 1.0, 1.0), "a red cat", "")])
        regional, _ = generate(pipe, ads, st, "unused", "", [5], regions=spec)
        plain, _ = generate(pipe, ads, st, "a red cat", "", [5])
        assert np.array_equal(_arr(regional), _arr(plain)), arch
    glob_only, _ = generate(pipe, ads, st, "a blue dog", "", [5])
    half = RegionSpec(prompt="a blue dog", regions=[Region((0.0, 0.0, 1.0, 0.5), "a red cat")])
    halved, _ = generate(pipe, ads, st, "unused", "", [5], regions=half)
    assert not np.array_equal(_arr(halved), _arr(glob_only))


def test_regions_file_validation():
    spec = parse_regions({"prompt": "g", "unit": "px", "regions": [{"box": [0, 0, 16, 32], "prompt": "r"}]}, 32, 32)
    assert spec.regions[0].box == (0.0, 0.0, 0.5, 1.0)
    with pytest.raises(ValueError, match="regions\\[0\\]"):
        parse_regions({"prompt": "g", "unit": "fraction", "regions": [{"box": [0.5, 0, 0.2, 1], "prompt": "r"}]}, 32, 32)
    with pytest.raises(ValueError, match="unknown keys"):
        parse_regions({"prompt": "g", "region": []}, 32, 32)


def test_frequency_score_orders_texture_above_smooth():
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    noise = (rng.random((64, 64)) * 255).astype(np.uint8)  # texture: energy at all radii
    checker = noise
    smooth = np.asarray(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(3)))  # same image, low-passed
    rgb = lambda a: np.repeat(a[..., None], 3, axis=2)  # noqa: E731
    s_check, s_smooth = high_frequency_score(rgb(checker)), high_frequency_score(rgb(smooth))
    assert s_check > s_smooth
    assert radial_profile(torch.rand(32, 32, dtype=torch.float64)).shape == (17,)
    order, groups = order_by_frequency([s_smooth, s_check, (s_smooth + s_check) / 2])
    assert order == [1, 2, 0] and groups == ["low", "high", "high"]
    assert order_by_frequency([0.1, 0.3], "low-first")[0] == [0, 1]


def test_adapter_switch_matches_set_adapters(sd1_pipe, adapter_files):
    pipe = copy.deepcopy(sd1_pipe)
    ads = load_adapters(pipe, adapter_files["sd1"][:2], weights=[0.7, 1.3])
    inp = unet_inputs(pipe, batch=1)
    with torch.no_grad():
        pipe.set_adapters([ads[1].name], [1.3])
        ref = pipe.unet(**inp).sample
        pipe.set_adapters([ads[0].name, ads[1].name], [0.7, 1.3])
        UNetAdapterSwitch(pipe.unet).activate([ads[1].name], [1.3])
        assert torch.equal(pipe.unet(**inp).sample, ref)
