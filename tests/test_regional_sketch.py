"""Two toy characters placed by their sketches (lorakit.toyworld.sketch / regional_demo): the sketch reaches each
region and moves the drawn figures onto the silhouettes; the oracle's per-region view finds each character on the
renders."""

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.resources import data_path
from lorakit.toyworld.regional_demo import character_views, foreground, iou, sample_scene, scene_regions
from lorakit.toyworld.sketch import (CHARACTER_EXTENT, CharacterScene, PlacedCharacter, random_character_scene,
                                     render_character_scene)


def test_character_scenes_keep_each_sprite_in_its_half():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = random_character_scene(rng, ("frog", "robot") if rng.random() < 0.5 else ("robot", "ghost"))
        _, sil = render_character_scene(scene)
        for k, c in enumerate(scene.characters):
            top, left, bottom, right = c.box()
            assert 0 <= top and bottom <= 1 and 0.5 * k <= left and right <= 0.5 * (k + 1)
        assert sil[:, :15].sum() > 10 and sil[:, 17:].sum() > 10  # a figure in each half
    assert set(CHARACTER_EXTENT) == {"robot", "frog", "ghost"}


def test_oracle_view_finds_each_character_on_the_render():
    from lorakit.toyworld.oracle import load_oracle

    scene = CharacterScene((PlacedCharacter("frog", 0.25, 0.55, 0.46), PlacedCharacter("robot", 0.76, 0.47, 0.5)))
    image, _ = render_character_scene(scene)
    views = character_views(image, scene)
    probs = load_oracle().score(views, ["frog", "robot"]).probs
    assert probs[0, 0] > 0.5 and probs[0, 1] < 0.5  # left view: the frog, not the robot
    assert probs[1, 1] > 0.5 and probs[1, 0] < 0.5
    # the bundled example is this scene
    sketch = np.asarray(Image.open(data_path("regional-sketch-example", "sketch.png")))
    assert np.array_equal(sketch, np.asarray(scene_regions(scene, adapter=object())[1][0].image))


@pytest.mark.slow
@torch.no_grad()
def test_sketch_per_region_moves_the_figures_onto_the_silhouettes():
    """No LoRAs (the mechanics only): the same seed with the sketch draws figures whose mask overlaps the
    silhouettes far more than without it, in both layouts (measured with the LoRAs, 64 scenes: docs/sampling.md).
    Here, 10 steps, seeds 1-4: IoU 0.55-0.62 with the sketch, 0.00-0.10 without; the thresholds sit between."""
    from diffusers import T2IAdapter

    from lorakit.sampling import load_pipeline

    pipe = load_pipeline(str(data_path("toy-base")), dtype="fp32", device="cpu")
    adapter = T2IAdapter.from_pretrained(str(data_path("toy-sketch-adapter"))).eval()
    rng = np.random.default_rng(7)
    for chars, seed in ((("frog", "robot"), 1), (("robot", "frog"), 2)):
        scene = random_character_scene(rng, chars)
        _, sil = render_character_scene(scene)
        without = sample_scene(pipe, [], adapter, scene, seed, "regional", steps=10)
        with_ = sample_scene(pipe, [], adapter, scene, seed, "regional+sketch", steps=10)
        a, b = iou(foreground(without), sil > 0.5), iou(foreground(with_), sil > 0.5)
        assert b > a + 0.2 and b > 0.4, (chars, a, b)


def test_v2_character_scenes_and_oracle_views():
    """v2 scenes (64 px, v2 sprites): each sprite inside its half, captions as v2's, and the oracle's window view
    finds each identity on the render and never the other one."""
    from lorakit.toyworld.v2.oracle import Oracle
    from lorakit.toyworld.v2.sketch import random_character_scene as v2_scene

    oracle = Oracle.load()
    rng = np.random.default_rng(1)
    found = 0
    for k in range(8):
        chars = ("kwibbit", "zorbo") if k % 2 == 0 else ("zorbo", "kwibbit")
        scene = v2_scene(rng, chars)
        image, sil = render_character_scene(scene)
        assert image.size == (64, 64) and sil.shape == (64, 64)
        for i, c in enumerate(scene.characters):
            top, left, bottom, right = c.box()
            assert 0 <= top and bottom <= 1 and 0.5 * i <= left and right <= 0.5 * (i + 1)
        views = character_views(image, scene)
        for c, view, other in zip(scene.characters, views, reversed(scene.characters)):
            p = oracle.score([view], [c.name, other.name]).present[0].tolist()
            found += p[0]
            assert not p[1]
    assert found >= 14  # of 16 regions (182 of 200 on 100 scenes)
    assert scene.global_prompt() == f"{chars[0]} {'robot' if chars[0] == 'zorbo' else 'frog'}, " \
                                    f"{chars[1]} {'robot' if chars[1] == 'zorbo' else 'frog'}, white plain background"


def test_pseudo_words_replace_identity_names():
    from lorakit.toyworld.regional_demo import with_words

    words = {"zorbo": "<zorbo1> <zorbo2>", "kwibbit": "<kwibbit1> <kwibbit2>"}
    assert with_words("kwibbit frog, zorbo robot, white plain background", words) == \
        "<kwibbit1> <kwibbit2> frog, <zorbo1> <zorbo2> robot, white plain background"
    assert with_words("<zorbo1> <zorbo2> robot", words) == "<zorbo1> <zorbo2> robot"  # already replaced: unchanged
    assert with_words("zorbo robot", None) == "zorbo robot"


def test_v2_example_folder_is_the_documented_scene():
    """data/regional-sketch-example-v2: its sketch and target are this scene's, both regions files read (64x64
    output, the v2 sketch adapter as the condition), the fused ED-LoRA one with the pseudo-words."""
    from lorakit.sampling.regional import load_regions
    from lorakit.toyworld.regional_demo import WORLDS, with_words
    from lorakit.toyworld.v2.sketch import CharacterScene as V2Scene
    from lorakit.toyworld.v2.sketch import PlacedCharacter as V2Character

    scene = V2Scene((V2Character("kwibbit", 0.25, 0.58, 0.44), V2Character("zorbo", 0.75, 0.52, 0.5)))
    target, sil = render_character_scene(scene)
    folder = data_path("regional-sketch-example-v2")
    assert WORLDS["v2"].example == str(folder)
    assert np.array_equal(np.asarray(Image.open(folder / "sketch.png")), np.asarray(scene_regions(scene, object())[1][0].image))
    assert np.array_equal(np.asarray(Image.open(folder / "target.png")), np.asarray(target))
    words = {"kwibbit": "<kwibbit1> <kwibbit2>", "zorbo": "<zorbo1> <zorbo2>"}
    for name, w in (("regions.yaml", words), ("regions-loras.yaml", None)):
        spec = load_regions(folder / name, 64, 64)
        assert spec.prompt == with_words(scene.global_prompt(), w)
        assert [r.prompt for r in spec.regions] == [with_words(p, w) for p in scene.region_prompts()]
        assert len(spec.conditions) == 1 and spec.conditions[0].model.endswith("toy2-sketch-adapter")


@pytest.mark.slow
@torch.no_grad()
def test_v2_sketch_adapter_moves_class_characters_onto_the_silhouettes():
    """The bundled v2 adapter on data/toy2-base, no LoRA (a frog and a robot of the base's classes): the same seed
    with the sketch draws figures that overlap the silhouettes far more than without it (measured on 64 scenes
    with the identities' adapters: docs/sampling.md). Here, 10 steps, seeds 1-2: IoU 0.69 and 0.80 with the sketch,
    0.15 and 0.16 without; the thresholds sit between."""
    from diffusers import T2IAdapter

    from lorakit.sampling import load_pipeline
    from lorakit.toyworld.regional_demo import WORLDS

    world = WORLDS["v2"]
    pipe = load_pipeline(world.base, dtype="fp32", device="cpu")
    adapter = T2IAdapter.from_pretrained(world.adapter).eval()
    rng = np.random.default_rng(7)
    for chars, seed in ((("frog", "robot"), 1), (("robot", "frog"), 2)):
        scene = world.random_scene(rng, chars)
        _, sil = render_character_scene(scene)
        without = sample_scene(pipe, [], adapter, scene, seed, "regional", steps=10)
        with_ = sample_scene(pipe, [], adapter, scene, seed, "regional+sketch", steps=10)
        a, b = iou(foreground(without), sil > 0.5), iou(foreground(with_), sil > 0.5)
        assert b > a + 0.3 and b > 0.5, (chars, a, b)
