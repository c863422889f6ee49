"""lorakit.sampling: split UNet, merge/switch/composite/cmlora equalities, cache schedule, regions, profiles."""

import copy

import numpy as np
import pytest
import torch

from lorakit.adapters.io import save_adapter
from lorakit.sampling import SamplerSettings, dominance_schedule, generate, load_adapters, step_weights
from lorakit.sampling.cache import cache_plan, unet_split_forward
from lorakit.sampling.composer import UNetAdapterSwitch, decode_latents, encode
from lorakit.sampling.frequency import high_frequency_score, order_by_frequency, radial_profile
from lorakit.sampling.regional import RegionSpec, Region, parse_regions
from lorakit.testing import random_adapter, unet_inputs


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models: one thread is faster than two on a shared 2-core machine (no OpenMP spinning).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


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
    for depth in range(1, len(pipe.unet.down_blocks)):
        full, deep = unet_split_forward(
            pipe.unet, inp["sample"], inp["timestep"], inp["encoder_hidden_states"], depth,
            added_cond_kwargs=inp.get("added_cond_kwargs"),
        )
        assert torch.equal(full, ref), depth
        shallow, _ = unet_split_forward(
            pipe.unet, inp["sample"], inp["timestep"], inp["encoder_hidden_states"], depth, deep_feature=deep,
            added_cond_kwargs=inp.get("added_cond_kwargs"),
        )
        assert torch.equal(shallow, ref), depth  # same inputs: the cached deep feature is exact
        moved, _ = unet_split_forward(
            pipe.unet, inp["sample"] + 0.5, inp["timestep"], inp["encoder_hidden_states"], depth, deep_feature=deep,
            added_cond_kwargs=inp.get("added_cond_kwargs"),
        )
        assert not torch.equal(moved, ref)  # the shallow path really recomputes
    with pytest.raises(ValueError, match="cache depth"):
        unet_split_forward(pipe.unet, inp["sample"], inp["timestep"], inp["encoder_hidden_states"], 0)


def test_dominance_schedule_and_plan():
    dom = dominance_schedule(40, [2, 0, 1], switch_every=5, warp=0.75)
    assert len(dom) == 40 and set(dom) == {0, 1, 2}
    runs, start = [], 0
    for s in range(1, 41):
        if s == 40 or dom[s] != dom[s - 1]:
            runs.append(s - start)
            start = s
    assert dom[0] == 2
    assert runs[0] < max(runs) and runs[-1] < max(runs)  # denser switching early and late
    assert dominance_schedule(12, [0, 1], 4, 0.0) == [0] * 4 + [1] * 4 + [0] * 4  # warp 0: uniform
    plan = cache_plan(dom, 3, interval=4)
    assert all(plan[0])
    for a in range(3):
        full = [s for s in range(40) if plan[s][a]]
        assert max(b - a_ for a_, b in zip(full, full[1:] + [40])) <= 4  # never older than the interval
        assert any(s >= 20 for s in full) and full[-1] >= 36  # refreshed until the end
    for s in range(1, 40):
        if dom[s] != dom[s - 1]:
            assert plan[s][dom[s]]  # the newly dominant adapter gets a full pass
    assert step_weights(1, 4, 0.55) == pytest.approx([0.15, 0.55, 0.15, 0.15])


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_composite_of_copies_equals_single_adapter(arch, sd1_pipe, sdxl_pipe, adapter_files):
    pipe = copy.deepcopy(sd1_pipe if arch == "sd1" else sdxl_pipe)
    f = adapter_files[arch][0]
    ads = load_adapters(pipe, [f, f, f])
    single, _ = generate(pipe, ads[:1], SamplerSettings(method="merge", steps=2, cfg=5.0), "a red cat", "", [1])
    comp, info = generate(pipe, ads, SamplerSettings(method="composite", steps=2, cfg=5.0), "a red cat", "", [1])
    assert info["passes"]["full"] == 6 and info["passes"]["shallow"] == 0
    assert np.abs(_arr(comp) - _arr(single)).max() <= 1


def test_switch_with_one_adapter_equals_merge(sd1_pipe, adapter_files):
    pipe = copy.deepcopy(sd1_pipe)
    ads = load_adapters(pipe, adapter_files["sd1"][:2])
    merged, _ = generate(pipe, ads[:1], SamplerSettings(method="merge", steps=3, cfg=5.0), "a cat", "", [4])
    switched, info = generate(pipe, ads[:1], SamplerSettings(method="switch", steps=3, cfg=5.0, switch_every=1), "a cat", "", [4])
    assert np.array_equal(_arr(merged), _arr(switched))
    two, info = generate(pipe, ads, SamplerSettings(method="switch", steps=4, cfg=5.0, switch_every=1), "a cat", "", [4])
    assert info["active_per_step"] == [0, 1, 0, 1]
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


def test_cmlora_no_cache_equals_direct_weighted_composite(sd1_pipe, adapter_files):
    pipe = copy.deepcopy(sd1_pipe)
    ads = load_adapters(pipe, adapter_files["sd1"])
    st = SamplerSettings(method="cmlora", steps=4, cfg=4.0, cache=False, switch_every=1, dominant_weight=0.6)
    order = [2, 0, 1]
    ours, info = generate(pipe, ads, st, "a cat", "", [7], order=order)
    dom = dominance_schedule(4, order, 1, st.schedule_warp)
    assert info["dominants"] == [ads[d].name for d in dom] and len(set(dom)) == 3
    assert info["passes"] == {**info["passes"], "full": 12, "shallow": 0}
    ref = _direct_weighted_composite(pipe, ads, 4, 4.0, "a cat", 7, [step_weights(d, 3, 0.6) for d in dom])
    assert np.abs(_arr(ours) - _arr(ref)).max() <= 1
    uniform, _ = generate(pipe, ads, SamplerSettings(method="composite", steps=4, cfg=4.0), "a cat", "", [7])
    assert not np.array_equal(_arr(uniform), _arr(ours))  # the dominant weighting matters


def test_cache_counts_match_plan_and_refresh_late(sd1_pipe, adapter_files):
    pipe = copy.deepcopy(sd1_pipe)
    ads = load_adapters(pipe, adapter_files["sd1"])
    steps = 8
    st = SamplerSettings(method="cmlora", steps=steps, cfg=3.0, cache=True, cache_interval=3, cache_depth=2, switch_every=3)
    _, info = generate(pipe, ads, st, "a cat", "", [0])
    plan = cache_plan(dominance_schedule(steps, [0, 1, 2], 3, st.schedule_warp), 3, 3)
    want_full = sum(sum(row) for row in plan)
    assert info["plan"] == [[int(v) for v in row] for row in plan]
    assert info["passes"]["full"] == want_full and info["passes"]["shallow"] == 3 * steps - want_full
    assert want_full < 3 * steps
    for i, a in enumerate(ads):
        per = info["passes"]["per_adapter"][a.name]
        assert per["full_steps"] == [s for s in range(steps) if plan[s][i]]
        assert any(s >= steps // 2 for s in per["full_steps"])  # refreshed in the second half


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
    spec = parse_regions({"prompt": "g", "regions": [{"box": [0, 0, 16, 32], "prompt": "r"}]}, 32, 32)
    assert spec.regions[0].box == (0.0, 0.0, 0.5, 1.0)
    with pytest.raises(ValueError, match="regions\\[0\\]"):
        parse_regions({"prompt": "g", "regions": [{"box": [0.5, 0, 0.2, 1], "prompt": "r"}]}, 32, 32)
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
