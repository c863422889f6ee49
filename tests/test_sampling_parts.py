"""Per-adapter prompt parts (--prompt-parts per-adapter) and per-adapter guidance (--adapter-guidance, delta)."""

import copy
from dataclasses import replace

import pytest
import torch

from lorakit.adapters.io import save_adapter
from lorakit.sampling import SamplerSettings, generate, load_adapters
from lorakit.sampling.composer import encode
from lorakit.sampling.methods import Term, method_plan
from lorakit.sampling.prompt_parts import adapter_prompt_parts, class_word_prompts
from lorakit.testing import random_adapter

PROMPT = "a cat, a red dog, on grass"
TRIGGERS = ("cat", "dog")


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory, sd1_pipe):
    root = tmp_path_factory.mktemp("parts")
    return [save_adapter(random_adapter(sd1_pipe, seed=k, text_encoder=True, std=0.2), root / f"a{k}.safetensors")
            for k in range(2)]


def test_prompt_parts_keep_own_trigger_and_scene():
    assert adapter_prompt_parts("kwibbit, hattock, white plain background, inkvel", ["kwibbit", "hattock", "inkvel"]) == [
        "kwibbit, white plain background", "hattock, white plain background", "white plain background, inkvel"]
    # whole words only: "cat" is not in "catalog"; a tag with two triggers goes to both
    assert adapter_prompt_parts("a cat, catalog, cat and dog", ["cat", "dog"]) == [
        "a cat, catalog, cat and dog", "catalog, cat and dog"]
    with pytest.raises(ValueError, match="'zorbo' is in no comma tag"):
        adapter_prompt_parts("kwibbit, inkvel", ["kwibbit", "zorbo"])


def test_class_words_take_other_triggers_out_and_keep_the_scene():
    base, parts = class_word_prompts("zorbo robot, hattock hat, chekka checker background", ["zorbo", "hattock", "chekka"])
    assert base == "robot, hat, checker background"
    assert parts == ["zorbo robot, hat, checker background", "robot, hattock hat, checker background",
                     "robot, hat, chekka checker background"]
    # whole words, any case; a tag with two triggers keeps only the pass's own
    base, parts = class_word_prompts("Zorbo robot and hattock hat, zorbot", ["zorbo", "hattock"])
    assert (base, parts) == ("robot and hat, zorbot", ["Zorbo robot and hat, zorbot", "robot and hattock hat, zorbot"])
    with pytest.raises(ValueError, match="'kwibbit' holds only trigger words"):
        class_word_prompts("kwibbit, hattock hat", ["kwibbit", "hattock"])
    with pytest.raises(ValueError, match="'zorbo' is in no comma tag"):
        class_word_prompts("kwibbit frog", ["zorbo"])
    for bad in ({"method": "merge", "prompt_parts": "class-words"}, {"method": "delta", "prompt_parts": "per-adapter",
                                                                      "masks": "attention"}):
        with pytest.raises(ValueError, match="merge has none|joint or class-words"):
            SamplerSettings(**bad).check()
    SamplerSettings(method="delta", prompt_parts="class-words", masks="attention").check()


def test_adapter_guidance_plan_and_checks():
    st = SamplerSettings(method="delta", uncond="base", adapter_guidance=(3.0, 1.0, 0.5))
    terms = method_plan(st, 3, 2, None, None).terms
    # eps = U_b + cfg (C - U_b), C = (1 - 4.5) c_b + 3 c_0 + c_1 + 0.5 c_2 = c_b + sum g_i (c_i - c_b)
    assert terms[0] == [Term((), 1.0, -3.5), Term((0,), 0.0, 3.0), Term((1,), 0.0, 1.0), Term((2,), 0.0, 0.5)]
    # per-adapter parts: each difference against the base on that adapter's part
    parts = method_plan(replace(st, prompt_parts="per-adapter"), 3, 2, None, None).terms[0]
    assert parts == [Term((), 1.0, 1.0)] + [t for i, g in enumerate((3.0, 1.0, 0.5))
                                           for t in (Term((i,), 0.0, g), Term((), 0.0, -g, part=i))]
    with pytest.raises(ValueError, match="2 values for 3 adapters"):
        method_plan(SamplerSettings(method="delta", adapter_guidance=(1.0, 2.0)), 3, 2, None, None)
    for bad, msg in (({"method": "composite", "adapter_guidance": (1.0,)}, "needs method delta"),
                     ({"method": "delta", "adapter_guidance": (-1.0,)}, ">= 0"),
                     ({"method": "merge", "prompt_parts": "per-adapter"}, "merge has none"),
                     ({"method": "cmlora", "cmlora_mode": "official", "prompt_parts": "per-adapter"}, "drop prompt_parts")):
        with pytest.raises(ValueError, match=msg):
            SamplerSettings(**bad).check()


def _reference(pipe, ads, gains, steps, cfg, seed, base_prompt=PROMPT, parts=("a cat, on grass", "a red dog, on grass"),
               base_parts=True):
    """Delta with the base's unconditional pass, prompt parts and gains, written out with diffusers:
    eps = u_b + cfg * (c_b + sum_i g_i (c_i - c_b,i) - u_b): c_i adapter i on its part (text encoded once with
    both adapters active, as --encode once), c_b and u_b the base on ``base_prompt``, c_b,i the base on part i
    (per-adapter parts) or c_b (``base_parts=False``: class-words)."""
    pipe.disable_lora()
    base_text = encode(pipe, base_prompt, "", 1, True)["embeds"]
    pipe.enable_lora()
    pipe.set_adapters([a.name for a in ads], [a.weight for a in ads])
    part_text = [encode(pipe, p, "", 1, False)["embeds"] for p in parts]
    pipe.disable_lora()
    base_part_text = [encode(pipe, p, "", 1, False)["embeds"] for p in parts]
    pipe.enable_lora()
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    latents = pipe.prepare_latents(1, 4, 32, 32, torch.float32, torch.device("cpu"), [torch.Generator().manual_seed(seed)])
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.scale_model_input(latents, t)
            pipe.disable_lora()
            u_b, c_b = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=base_text).sample.chunk(2)
            pipe.enable_lora()
            cond = c_b.clone()
            for a, g, text, base_part in zip(ads, gains, part_text, base_part_text):
                pipe.disable_lora()
                c_bi = pipe.unet(x, t, encoder_hidden_states=base_part).sample if base_parts else c_b
                pipe.enable_lora()
                pipe.set_adapters([a.name], [a.weight])
                cond += g * (pipe.unet(x, t, encoder_hidden_states=text).sample - c_bi)
            latents = sched.step(u_b + cfg * (cond - u_b), t, latents).prev_sample
    return latents


def test_delta_parts_and_guidance_equal_the_formula(sd1_pipe, two_adapters):
    pipe = copy.deepcopy(sd1_pipe)
    ads = load_adapters(pipe, two_adapters, [0.8, 0.8])
    st = SamplerSettings(method="delta", uncond="base", steps=3, cfg=4.0, prompt_parts="per-adapter",
                         triggers=TRIGGERS, adapter_guidance=(2.0, 0.5))
    ours, info = generate(pipe, ads, st, PROMPT, "", [5], output_type="latent")
    assert info["prompt_parts"] == ["a cat, on grass", "a red dog, on grass"]
    ref = _reference(pipe, ads, (2.0, 0.5), 3, 4.0, 5)
    assert (ours - ref).abs().max() < 1e-4
    joint, _ = generate(pipe, ads, SamplerSettings(method="delta", uncond="base", steps=3, cfg=4.0,
                                                   adapter_guidance=(2.0, 0.5)), PROMPT, "", [5], output_type="latent")
    assert (joint - ours).abs().max() > 1e-3  # the parts change what the adapters see
    plain, _ = generate(pipe, ads, SamplerSettings(method="delta", uncond="base", steps=3, cfg=4.0), PROMPT, "", [5],
                        output_type="latent")
    assert (plain - joint).abs().max() > 1e-3  # and the gains change the result


def test_delta_with_class_words_equals_the_formula(sd1_pipe, two_adapters):
    pipe = copy.deepcopy(sd1_pipe)
    ads = load_adapters(pipe, two_adapters, [0.8, 0.8])
    prompt = "a cat toy, a red dog puppy, on grass"
    st = SamplerSettings(method="delta", uncond="base", steps=3, cfg=4.0, prompt_parts="class-words", triggers=TRIGGERS)
    ours, info = generate(pipe, ads, st, prompt, "", [5], output_type="latent")
    parts = ["a cat toy, a red puppy, on grass", "a toy, a red dog puppy, on grass"]
    assert info["prompt_parts"] == parts
    ref = _reference(pipe, ads, (1.0, 1.0), 3, 4.0, 5, "a toy, a red puppy, on grass", parts, base_parts=False)
    assert (ours - ref).abs().max() < 1e-4
    joint, _ = generate(pipe, ads, replace(st, prompt_parts="joint"), prompt, "", [5], output_type="latent")
    assert (joint - ours).abs().max() > 1e-3


def test_prompt_parts_need_triggers(sd1_pipe, two_adapters):
    pipe = copy.deepcopy(sd1_pipe)
    ads = load_adapters(pipe, two_adapters)
    with pytest.raises(ValueError, match="no trigger for"):  # random adapters carry no lorakit.trigger
        generate(pipe, ads, SamplerSettings(method="composite", steps=1, prompt_parts="per-adapter"), PROMPT, "", [0])
