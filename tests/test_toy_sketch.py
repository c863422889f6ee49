"""Toy-world sketch scenes (image + silhouette) and the sketch-adapter measurement's helpers."""

import json
from pathlib import Path

import measure_toy_sketch_adapter
import numpy as np
import train_toy_sketch_adapter
from PIL import Image

from lorakit.toyworld.sketch import random_sketch_scene, render_sketch_scene, silhouette_image

ROOT = Path(__file__).resolve().parents[1]


def test_silhouette_marks_the_drawn_shapes_one_per_half():
    rng = np.random.default_rng(0)
    for _ in range(5):
        scene = random_sketch_scene(rng, 2, "plain", "white")
        image, sil = render_sketch_scene(scene)
        assert image.size == (32, 32) and sil.shape == (32, 32) and 0 <= sil.min() and sil.max() <= 1
        drawn = np.abs(np.asarray(image, np.float32) - np.asarray(image, np.float32)[0, 0]).max(-1) > 40
        assert (drawn == (sil > 0.5)).mean() > 0.95  # the silhouette is where the shapes are
        cols = np.nonzero(sil > 0.5)[1]
        assert cols.min() < 16 <= cols.max()  # a shape in each half
        assert scene.shapes[0].cx < 0.5 < scene.shapes[1].cx
        assert len(scene.region_prompts()) == 2 and scene.region_prompts()[0].endswith("white plain background")
    again = render_sketch_scene(scene)
    assert np.array_equal(np.asarray(again[0]), np.asarray(image)) and np.array_equal(again[1], sil)
    assert silhouette_image(sil).mode == "L"


def test_measure_helpers():
    tool = measure_toy_sketch_adapter
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert tool.iou(a, b) == 4 / 12
    img = Image.new("RGB", (32, 32), (250, 200, 210))  # a pink background counts as background
    img.paste((0, 0, 255), (2, 2, 10, 10))
    fg = tool.foreground(img)
    assert fg.sum() == 64 and fg[2:10, 2:10].all()
    scene = random_sketch_scene(np.random.default_rng(3), 2, "plain", "white")
    image, _ = render_sketch_scene(scene)
    views = tool.region_views(image, scene)
    assert [v.size for v in views] == [(32, 32), (32, 32)]
    from lorakit.toyworld.oracle import load_oracle

    oracle = load_oracle()
    for p, v in zip(scene.shapes, views):  # the view the measurement reads finds the rendered shape and colour
        assert oracle.score([v], [p.shape, p.color]).present.all()
    lo, hi = tool.wilson(8, 10)
    assert 0.44 < lo < 0.5 and 0.94 < hi < 0.98
    assert tool.mcnemar_exact(6, 0) == 2 / 64 and tool.paired([0, 1, 0, 1], [1, 1, 1, 0]) == {"wins": 2, "losses": 1, "p_mcnemar": 1.0}


def test_training_tool_writes_a_loadable_adapter_deterministically(tmp_path):
    import torch
    from diffusers import T2IAdapter

    tool = train_toy_sketch_adapter
    for name in ("a", "b"):
        assert tool.main(["--steps", "2", "--batch", "2", "--out", str(tmp_path / name), "--log-every", "1"]) == 0
    a, b = (T2IAdapter.from_pretrained(tmp_path / n) for n in ("a", "b"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert json.loads((tmp_path / "a" / "train_log.json").read_text())["steps"] == 2


def test_v2_training_in_parts_equals_one_run(tmp_path):
    """--world v2 --work: 2 steps, then a second call to 3, gives the 3-step run's weights bit for bit."""
    import torch
    from diffusers import T2IAdapter

    tool = train_toy_sketch_adapter
    common = ["--world", "v2", "--batch", "2", "--log-every", "1"]
    assert tool.main([*common, "--steps", "3", "--out", str(tmp_path / "one")]) == 0
    work = ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "parts")]
    assert tool.main([*common, "--steps", "3", "--budget-s", "0", *work]) == 3  # no time for a step: call again
    assert tool.main([*common, "--steps", "2", *work]) == 0
    assert tool.main([*common, "--steps", "3", *work]) == 0
    a, b = (T2IAdapter.from_pretrained(tmp_path / n) for n in ("one", "parts"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    log = json.loads((tmp_path / "parts" / "train_log.json").read_text())
    assert log["steps"] == 3 and log["adapter_config"]["downscale_factor"] == 4  # 64 px sketch -> 16x16 latents
    import pytest

    with pytest.raises(SystemExit, match="other settings"):  # a checkpoint continues only with the same settings
        tool.main([*common, "--steps", "4", "--lr", "0.1", *work])


def test_v2_training_scenes_one_or_two_class_characters():
    from lorakit.toyworld.v2.sketch import render_character_scene, training_scene

    rng = np.random.default_rng(0)
    for k in range(6):
        scene = training_scene(rng, 1 + k % 2)
        image, sil = render_character_scene(scene)
        assert image.size == (64, 64) and sil.shape == (64, 64) and sil.max() == 1.0
        assert len(scene.characters) == 1 + k % 2 and all(c.name in ("frog", "robot", "ghost") for c in scene.characters)
        if k % 2:
            assert sil[:, :30].sum() > 20 and sil[:, 34:].sum() > 20
            assert scene.global_prompt().count(",") == 2  # 'red frog, blue robot, <background>'
