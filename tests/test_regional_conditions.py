"""Spatial conditions (T2I-Adapter, ControlNet) in lorakit sampling, on tiny random models built in code."""

import copy
import re

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.sampling import SamplerSettings, generate, load_adapters
from lorakit.sampling.cache import unet_split_forward
from lorakit.sampling.conditions import Condition, weight_map
from lorakit.sampling.regional import Region, RegionSpec, parse_regions


def tiny_t2i(unet, seed=0, in_channels=1, vae_factor=2):
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    return T2IAdapter(in_channels=in_channels, channels=list(unet.config.block_out_channels), num_res_blocks=1,
                      downscale_factor=vae_factor, adapter_type="full_adapter").eval()


def tiny_controlnet(unet, seed=0):
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))  # image / 2: the tiny VAE's factor
    with torch.no_grad():  # ControlNet's zero convolutions start at zero: make its residuals non-zero
        for m in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
            m.weight.normal_(0, 0.2)
    return cn.eval()


def sketch(size=32, seed=0):
    rng = np.random.default_rng(seed)
    a = np.zeros((size, size), np.uint8)
    y, x = rng.integers(0, size // 2, 2)
    a[y : y + size // 2, x : x + size // 2] = 255
    return Image.fromarray(a, "L")


@pytest.fixture(scope="module")
def sd1(sd1_pipe, tmp_path_factory):
    from lorakit.adapters.io import save_adapter
    from lorakit.testing import random_adapter

    pipe = copy.deepcopy(sd1_pipe)
    root = tmp_path_factory.mktemp("cond_adapters")
    files = [save_adapter(random_adapter(pipe, seed=20 + k, std=0.2), root / f"c{k}.safetensors") for k in range(2)]
    return pipe, files


def _latents(pipe, ads, conds, method="merge", regions=None, steps=3, **kw):
    st = SamplerSettings(method=method, steps=steps, cfg=4.0, **kw)
    lat, info = generate(pipe, ads, st, "a red cat", "", [4], regions=regions, output_type="latent", conditions=conds)
    return lat


def test_weight_map_sets_boxes_later_entries_win():
    m = weight_map(0.5, [((0.0, 0.0, 1.0, 0.5), 1.0), ((0.0, 0.25, 0.5, 1.0), 0.0)], 4, 4, "inside")
    assert m.tolist() == [[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.5, 0.5], [1.0, 1.0, 0.5, 0.5]]


def test_t2i_adapter_matches_diffusers_adapter_pipeline(sd1):
    """Plain sampling (no LoRA) with a T2I-Adapter equals diffusers' StableDiffusionAdapterPipeline (1e-4)."""
    from diffusers import StableDiffusionAdapterPipeline

    pipe, _ = sd1
    adapter = tiny_t2i(pipe.unet)
    ours = _latents(pipe, [], [Condition(adapter, sketch(), 0.7)])
    ref_pipe = StableDiffusionAdapterPipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, adapter,
                                              pipe.scheduler, None, None, requires_safety_checker=False)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe("a red cat", sketch(), height=32, width=32, num_inference_steps=3, guidance_scale=4.0,
                   generator=torch.Generator().manual_seed(4), adapter_conditioning_scale=0.7, output_type="latent").images
    assert (ours - ref).abs().max() < 1e-4
    plain = _latents(pipe, [], None)
    assert (ours - plain).abs().max() > 1e-3  # the condition reached the UNet


def test_controlnet_matches_diffusers_controlnet_pipeline(sd1):
    from diffusers import StableDiffusionControlNetPipeline

    pipe, _ = sd1
    cn = tiny_controlnet(pipe.unet)
    image = sketch(seed=1).convert("RGB")
    ours = _latents(pipe, [], [Condition(cn, image, 0.6)])
    ref_pipe = StableDiffusionControlNetPipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, cn,
                                                 pipe.scheduler, None, None, requires_safety_checker=False)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe("a red cat", image, height=32, width=32, num_inference_steps=3, guidance_scale=4.0,
                   generator=torch.Generator().manual_seed(4), controlnet_conditioning_scale=0.6, output_type="latent").images
    assert (ours - ref).abs().max() < 1e-4
    assert (ours - _latents(pipe, [], None)).abs().max() > 1e-3


def test_controlnet_window_matches_diffusers_control_guidance_start_end(sd1):
    """``start`` / ``end`` follow diffusers' control_guidance_start / end (step i of n acts unless i / n < start
    or (i + 1) / n > end)."""
    from diffusers import StableDiffusionControlNetPipeline

    pipe, _ = sd1
    cn = tiny_controlnet(pipe.unet, seed=4)
    image = sketch(seed=2).convert("RGB")
    ours = _latents(pipe, [], [Condition(cn, image, 0.9, start=0.25, end=0.75)], steps=4)
    ref_pipe = StableDiffusionControlNetPipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, cn,
                                                 pipe.scheduler, None, None, requires_safety_checker=False)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe("a red cat", image, height=32, width=32, num_inference_steps=4, guidance_scale=4.0,
                   generator=torch.Generator().manual_seed(4), controlnet_conditioning_scale=0.9,
                   control_guidance_start=0.25, control_guidance_end=0.75, output_type="latent").images
    assert (ours - ref).abs().max() < 1e-4
    assert (ours - _latents(pipe, [], [Condition(cn, image, 0.9)], steps=4)).abs().max() > 1e-3


def test_t2i_adapter_window_no_step_equals_none_first_step_only_differs(sd1):
    pipe, files = sd1
    p = copy.deepcopy(pipe)
    ads = load_adapters(p, files[:1])
    t2i = tiny_t2i(p.unet, seed=5)
    none = _latents(p, ads, None)
    assert torch.equal(_latents(p, ads, [Condition(t2i, sketch(), 1.0, start=0.5, end=0.6)]), none)  # no step of 3
    full = _latents(p, ads, [Condition(t2i, sketch(), 1.0)])
    assert torch.equal(_latents(p, ads, [Condition(t2i, sketch(), 1.0, start=0.0, end=1.0)]), full)
    first = _latents(p, ads, [Condition(t2i, sketch(), 1.0, end=0.34)])
    assert (first - none).abs().max() > 1e-3 and (first - full).abs().max() > 1e-3
    # two adapters with different windows: each acts in its own steps only
    other = tiny_t2i(p.unet, seed=6)
    both = _latents(p, ads, [Condition(t2i, sketch(), 1.0, end=0.34), Condition(other, sketch(seed=3), 1.0, start=0.5, end=0.6)])
    assert torch.equal(both, first)


# merge in the fast tests; the other methods (11-14 s wall each on the loaded CI machine) in the slow ones
@pytest.mark.parametrize("method", ["merge", *[pytest.param(m, marks=pytest.mark.slow)
                                               for m in ("switch", "composite", "cmlora", "delta")]])
def test_every_method_zero_weight_equals_none_and_weight_changes_it(sd1, method):
    pipe, files = sd1
    p = copy.deepcopy(pipe)
    t2i, cn = tiny_t2i(p.unet, seed=1), tiny_controlnet(p.unet, seed=2)  # ControlNet from the UNet before any LoRA
    ads = load_adapters(p, files)
    kw = {"cmlora_interval": 2} if method == "cmlora" else {}  # cmlora: with its deep-feature cache
    none = _latents(p, ads, None, method, **kw)
    zero = _latents(p, ads, [Condition(t2i, sketch(), 0.0), Condition(cn, sketch().convert("RGB"), 0.0)], method, **kw)
    assert torch.equal(zero, none)
    for cond in ([Condition(t2i, sketch(), 1.0)], [Condition(cn, sketch().convert("RGB"), 1.0)]):
        assert (_latents(p, ads, cond, method, **kw) - none).abs().max() > 1e-3


def test_region_weights_zero_over_the_image_equals_none_and_with_regions(sd1):
    pipe, files = sd1
    p = copy.deepcopy(pipe)
    ads = load_adapters(p, files[:1])
    t2i = tiny_t2i(p.unet, seed=3)
    spec = RegionSpec("a blue dog", regions=[Region((0.0, 0.0, 1.0, 0.5), "a red cat")])
    none = _latents(p, ads, None, regions=spec)
    zeroed = _latents(p, ads, [Condition(t2i, sketch(), 1.0, [((0.0, 0.0, 1.0, 1.0), 0.0)])], regions=spec)
    assert torch.equal(zeroed, none)
    left = _latents(p, ads, [Condition(t2i, sketch(), 0.0, [((0.0, 0.0, 1.0, 0.5), 1.0)])], regions=spec)
    full = _latents(p, ads, [Condition(t2i, sketch(), 1.0)], regions=spec)
    assert (left - none).abs().max() > 1e-3 and (left - full).abs().max() > 1e-3


def _split_inputs(pipe, t2i, cn, image):
    from lorakit.testing import unet_inputs

    inp = unet_inputs(pipe, batch=2, seed=5)
    feats = [f.expand(2, *f.shape[1:]) for f in t2i(torch.from_numpy(np.asarray(image, np.float32) / 255)[None, None])]
    down, mid = cn(inp["sample"], inp["timestep"], inp["encoder_hidden_states"],
                   controlnet_cond=torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 255).permute(2, 0, 1)[None].expand(2, -1, -1, -1),
                   return_dict=False)
    return inp, feats, down, mid


@torch.no_grad()
def test_split_forward_with_residuals_equals_unet(sd1):
    pipe, _ = sd1
    t2i, cn = tiny_t2i(pipe.unet, seed=4), tiny_controlnet(pipe.unet, seed=5)
    inp, feats, down, mid = _split_inputs(pipe, t2i, cn, sketch(seed=2))
    for kw in ({"down_intrablock_additional_residuals": feats},
               {"down_block_additional_residuals": down, "mid_block_additional_residual": mid},
               {"down_intrablock_additional_residuals": feats, "down_block_additional_residuals": down,
                "mid_block_additional_residual": mid}):
        ref = pipe.unet(**inp, **{k: list(v) if isinstance(v, (list, tuple)) else v for k, v in kw.items()}).sample
        for depth in range(1, len(pipe.unet.down_blocks)):
            full, deep = unet_split_forward(pipe.unet, inp["sample"], inp["timestep"], inp["encoder_hidden_states"], depth, **kw)
            assert torch.equal(full, ref), (depth, list(kw))
            shallow, _ = unet_split_forward(pipe.unet, inp["sample"], inp["timestep"], inp["encoder_hidden_states"], depth,
                                            deep_feature=deep, **kw)
            assert torch.equal(shallow, ref), (depth, list(kw))
    assert len(feats) == 4  # the caller's list is not consumed


def test_adapter_that_does_not_fit_is_one_line(sd1):
    pipe, _ = sd1
    bad = tiny_t2i(pipe.unet, vae_factor=4)  # features at half the latent size
    with pytest.raises(ValueError, match="feature shapes .* do not fit this UNet's down blocks"):
        _latents(pipe, [], [Condition(bad, sketch(), 1.0)])


def test_regions_file_conditions(tmp_path):
    sketch().save(tmp_path / "s.png")
    sketch(size=64).save(tmp_path / "big.png")
    Image.new("L", (64, 32)).save(tmp_path / "wide.png")
    base = {"prompt": "g", "unit": "px", "regions": [{"box": [0, 0, 32, 16], "prompt": "a"}, {"box": [0, 16, 32, 32], "prompt": "b"}]}

    def parse(cond):
        return parse_regions({**base, "conditions": [cond]}, 32, 32, "r.yaml", base_dir=tmp_path)

    spec = parse({"type": "t2i-adapter", "model": "m", "image": "s.png", "weight": 0.8, "region_weights": [0.5, None]})
    c = spec.conditions[0]
    assert c.weight == 0.8 and c.region_weights == [((0.0, 0.0, 1.0, 0.5), 0.5)] and c.image == str(tmp_path / "s.png")
    assert (c.start, c.end) == (0.0, 1.0) and c.to_dict()["end"] == 1.0
    windowed = parse({"type": "t2i-adapter", "model": "m", "image": "s.png", "start": 0.1, "end": 0.6}).conditions[0]
    assert (windowed.start, windowed.end) == (0.1, 0.6)
    (tmp_path / "cn").mkdir()
    assert parse({"type": "controlnet", "model": "cn", "image": "s.png"}).conditions[0].model == str(tmp_path / "cn")
    boxed = parse({"type": "controlnet", "model": "m", "image": "big.png", "region_weights": [{"box": [0, 0, 16, 32], "weight": 0}]})
    assert boxed.conditions[0].region_weights == [((0.0, 0.0, 0.5, 1.0), 0.0)]
    errors = [
        ({"type": "t2i-adapter", "model": "m", "image": "wide.png"}, r"r.yaml: conditions\[0\]: image .*wide.png is 64x32; expected 32x32"),
        ({"type": "lora", "model": "m", "image": "s.png"}, r"conditions\[0\]: type must be one of t2i-adapter, controlnet"),
        ({"type": "controlnet", "model": "m", "image": "nope.png"}, r"conditions\[0\]: image not found"),
        ({"type": "controlnet", "model": "m", "image": "s.png", "scale": 1}, r"conditions\[0\]: unknown keys \['scale'\]"),
        ({"type": "controlnet", "image": "s.png"}, r"conditions\[0\]: missing model"),
        ({"type": "controlnet", "model": "m", "image": "s.png", "region_weights": [1.0]}, "has 1 numbers for 2 regions"),
        ({"type": "controlnet", "model": "m", "image": "s.png", "start": 0.6, "end": 0.6},
         r"conditions\[0\]: start 0.6 and end 0.6 must satisfy 0 <= start < end <= 1"),
        ({"type": "controlnet", "model": "m", "image": "s.png", "end": "late"}, r"conditions\[0\]: end: expected a number"),
        ({"type": "controlnet", "model": "m", "image": "s.png", "region_weights": [{"box": [0, 0, 40, 8], "weight": 1}]},
         r"conditions\[0\]: region_weights\[0\]: box \[0, 0, 40, 8\] \(px\)"),
    ]
    for cond, msg in errors:
        with pytest.raises(ValueError, match=msg):
            parse(cond)


def test_cli_fused_model_with_conditions_from_regions_file(tmp_path, sd1_pipe):
    """No adapters (a fused model), a T2I-Adapter and a ControlNet from folders named in the regions file."""
    import json

    from lorakit.cli import main

    tiny_t2i(sd1_pipe.unet).save_pretrained(tmp_path / "t2i")
    tiny_controlnet(sd1_pipe.unet).save_pretrained(tmp_path / "cn")
    sketch().save(tmp_path / "s.png")
    sketch(seed=3).convert("RGB").save(tmp_path / "c.png")
    (tmp_path / "r.yaml").write_text(
        "unit: fraction\nprompt: a blue dog\nregions:\n  - {box: [0, 0, 1, 0.5], prompt: a red cat}\n"
        "conditions:\n  - {type: t2i-adapter, model: t2i, image: s.png, region_weights: [0.5]}\n"
        "  - {type: controlnet, model: cn, image: c.png, weight: 0.3}\n".replace("model: t2i", f"model: {tmp_path / 't2i'}")
        .replace("model: cn", f"model: {tmp_path / 'cn'}"))
    rc = main(["sample", "--base", "tiny:sd1", "--regions", str(tmp_path / "r.yaml"), "--steps", "2", "--out",
               str(tmp_path / "out")])
    assert rc == 0
    side = json.loads((tmp_path / "out" / "000-0000-s0.json").read_text())
    assert [c["type"] for c in side["regions"]["conditions"]] == ["t2i-adapter", "controlnet"]
    assert side["adapters"] == [] and len(side["regions"]["conditions"][0]["image_sha256"]) == 64
    from lorakit.sampling import regenerate

    again = regenerate(tmp_path / "out" / "000-0000-s0.json", tmp_path / "again")
    assert again.read_bytes() == (tmp_path / "out" / "000-0000-s0.png").read_bytes()


@torch.no_grad()
def test_controlnet_reads_the_first_layer_of_layerwise_text(sd1):
    from lorakit.sampling.conditions import SpatialConditions

    pipe, _ = sd1
    cn = tiny_controlnet(pipe.unet, seed=6)
    sc = SpatialConditions([Condition(cn, sketch().convert("RGB"), 1.0)], pipe.unet, 32, 32, (16, 16))
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    packed = torch.cat([text, torch.randn_like(text)], dim=-1)  # ED-LoRA layout: layer 0 | layer 1
    a = sc.unet_kwargs(0, "pair", x, t, text)
    b = sc.unet_kwargs(1, "pair", x, t, packed)
    assert torch.equal(a["mid_block_additional_residual"], b["mid_block_additional_residual"])
    with pytest.raises(ValueError, match="width 45 do not fit"):
        sc.unet_kwargs(2, "pair", x, t, torch.randn(2, 77, 45))


def test_missing_condition_model_is_one_line_naming_the_file(tmp_path):
    from lorakit.sampling.conditions import load_conditions

    sketch().save(tmp_path / "s.png")
    spec = parse_regions({"prompt": "g", "conditions": [{"type": "t2i-adapter", "model": str(tmp_path / "none"),
                                                          "image": "s.png"}]}, 32, 32, "r.yaml", base_dir=tmp_path)
    with pytest.raises(ValueError, match=r"r.yaml: conditions\[0\]: cannot load t2i-adapter .*none") as err:
        load_conditions(spec.conditions, "cpu", torch.float32, spec.source)
    assert "\n" not in str(err.value)


def test_sdxl_t2i_adapter_xl_reaches_the_unet(sdxl_pipe):
    from diffusers import T2IAdapter

    pipe = copy.deepcopy(sdxl_pipe)
    torch.manual_seed(0)
    ch = list(pipe.unet.config.block_out_channels)
    xl = T2IAdapter(in_channels=1, channels=ch + ch[-1:], num_res_blocks=1, downscale_factor=2 * pipe.vae_scale_factor,
                    adapter_type="full_adapter_xl").eval()  # features for the 3 down blocks and the mid block
    spec = RegionSpec("a blue dog", regions=[Region((0.0, 0.0, 1.0, 0.5), "a red cat")])
    none = _latents(pipe, [], None, regions=spec, steps=2)
    assert torch.equal(_latents(pipe, [], [Condition(xl, sketch(), 0.0)], regions=spec, steps=2), none)
    assert (_latents(pipe, [], [Condition(xl, sketch(), 1.0)], regions=spec, steps=2) - none).abs().max() > 1e-3


def test_sdxl_controlnet_reaches_the_unet(sdxl_pipe):
    pipe = copy.deepcopy(sdxl_pipe)
    cn = tiny_controlnet(pipe.unet, seed=7)  # SDXL: the ControlNet takes the pooled text and time ids too
    image = sketch(seed=4).convert("RGB")
    none = _latents(pipe, [], None, steps=2)
    assert torch.equal(_latents(pipe, [], [Condition(cn, image, 0.0)], steps=2), none)
    assert (_latents(pipe, [], [Condition(cn, image, 1.0)], steps=2) - none).abs().max() > 1e-3


@pytest.mark.parametrize("body, entry", [
    ("regions:\n  - {box: [0, 0, 1.5, 0.5], prompt: a}\n", r"regions\[0\]: box \[0, 0, 1.5, 0.5\] \(fraction\) must satisfy"),
    ("regions:\n  - {box: [0, 0, 1, 0.5], prompt: a, weight: 2}\n", r"regions\[0\]: unknown keys \['weight'\]"),
    ("scale: 2\nregions: []\n", r"unknown keys \['scale'\]"),
    ("regions:\n  - {box: [0, 0, 1, 0.5], prompt: a}\nconditions:\n  - {type: t2i-adapter, model: m, image: wide.png}\n",
     r"conditions\[0\]: image .*wide.png is 64x32; expected 32x32"),
    ("regions:\n  - {box: [0, 0, 1, 0.5], prompt: a}\nconditions:\n  - {type: t2i-adapter, model: m, image: s.png, "
     "region_weights: [{box: [0, 0, 2, 1], weight: 1}]}\n", r"conditions\[0\]: region_weights\[0\]: box \[0, 0, 2, 1\]"),
])
def test_cli_bad_regions_file_is_one_line_naming_file_and_entry_exit_2(tmp_path, capsys, body, entry):
    """The issue's bad inputs (a box out of range, unknown keys, a condition image of the wrong size) through
    `lorakit sample`: exit 2, one line on stderr naming the file and the entry, no traceback."""
    from lorakit.cli import main

    Image.new("L", (64, 32)).save(tmp_path / "wide.png")
    sketch().save(tmp_path / "s.png")
    (tmp_path / "r.yaml").write_text("unit: fraction\nprompt: g\n" + body)
    rc = main(["sample", "--base", "tiny:sd1", "--regions", str(tmp_path / "r.yaml"), "--steps", "1", "--out",
               str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(tmp_path / "r.yaml") in err and re.search(entry, err), err
    assert not list(tmp_path.glob("out/*.png"))
