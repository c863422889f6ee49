import numpy as np
import pytest

from lorakit.toyworld.concepts import CONCEPTS, GENERIC, HELDOUT, VOCAB, get_concept
from lorakit.toyworld.dataset import make_dataset
from lorakit.toyworld.render import Scene, caption, render
from lorakit.toyworld.scenes import concept_scene, mixed_scene


def test_concept_sets_are_disjoint_and_complete():
    assert not {c.name for c in GENERIC} & {c.name for c in HELDOUT}
    kinds = [c.kind for c in HELDOUT]
    assert kinds.count("character") >= 3 and kinds.count("object") >= 2
    assert kinds.count("style") >= 2 and kinds.count("background") >= 2
    triggers = [c.trigger for c in HELDOUT]
    assert len(set(triggers)) == len(triggers) and all(t in VOCAB for t in triggers)
    assert get_concept("zorbo").name == "robot"
    with pytest.raises(ValueError, match="unknown toy-world concept"):
        get_concept("dragon")


def test_render_is_deterministic_by_seed():
    scene = Scene("stripes", "cyan", characters=("robot",), objects=("tophat",), style="ink", seed=5)
    a, b = np.asarray(render(scene)), np.asarray(render(scene))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    other = np.asarray(render(Scene("stripes", "cyan", characters=("robot",), objects=("tophat",), style="ink", seed=6)))
    assert not np.array_equal(a, other)
    rng1, rng2 = np.random.default_rng(3), np.random.default_rng(3)
    assert [mixed_scene(rng1) for _ in range(20)] == [mixed_scene(rng2) for _ in range(20)]


def test_render_draws_what_the_spec_says():
    plain = np.asarray(render(Scene("plain", "white", seed=0)), np.float32)
    assert np.allclose(plain, [240, 240, 232], atol=1)
    red = np.asarray(render(Scene("plain", "white", "square", "red", seed=0)), np.float32)
    reddish = (red[..., 0] > 180) & (red[..., 1] < 80)
    assert 0.15 < reddish.mean() < 0.45  # the square covers a fair part of the image
    pix = np.asarray(render(Scene("plain", "white", characters=("frog",), style="pixel", seed=1)))
    assert np.array_equal(pix[::2, ::2], pix[1::2, 1::2])  # 2x2 blocks
    with pytest.raises(ValueError, match="unknown character 'dragon'"):
        Scene(characters=("dragon",))


def test_captions_use_triggers_and_tags():
    scene = Scene("checker", characters=("frog", "ghost"), objects=("mushroom",), style="pixel")
    assert caption(scene) == "kwibbit, bloopo, shroomel, chekka, pixlor"
    assert caption(Scene("gradient", "sand", "cross", "blue")) == "blue cross, sand gradient background"
    assert Scene("gradient", "sand", "cross", "blue").concepts() == {"gradient", "cross", "blue"}


@pytest.mark.parametrize("name", [c.name for c in HELDOUT])
def test_concept_scenes_show_the_concept(name):
    rng = np.random.default_rng(0)
    for _ in range(10):
        assert name in concept_scene(name, rng).concepts()


def test_make_dataset_writes_image_caption_pairs(tmp_path):
    paths = make_dataset("kwibbit", tmp_path / "a", n=4, seed=1)
    assert [p.name for p in paths] == [f"{i:05d}.png" for i in range(4)]
    caps = [(tmp_path / "a" / f"{i:05d}.txt").read_text() for i in range(4)]
    assert all(c.startswith("kwibbit, ") for c in caps)
    make_dataset("frog", tmp_path / "b", n=4, seed=1)
    assert all((tmp_path / "a" / p.name).read_bytes() == (tmp_path / "b" / p.name).read_bytes() for p in paths)
    assert set(CONCEPTS) >= {"frog"}


def test_generic_dataset_has_generic_captions_only(tmp_path):
    from lorakit.toyworld.concepts import BY_TRIGGER

    make_dataset("generic", tmp_path / "g", n=24, seed=3)
    caps = [(tmp_path / "g" / f"{i:05d}.txt").read_text().strip() for i in range(24)]
    assert all(c.endswith(" background") for c in caps)
    assert not any(t in c for c in caps for t in BY_TRIGGER)  # regularisation images never name a held-out concept
    assert sum("," in c for c in caps) >= 18  # mostly a shape and a background (a few empty backgrounds)
    make_dataset("generic", tmp_path / "h", n=24, seed=3)
    assert (tmp_path / "g" / "00007.png").read_bytes() == (tmp_path / "h" / "00007.png").read_bytes()


def test_recipe_hash_covers_the_regularisation_images(tmp_path):
    from lorakit.config import load_config
    from lorakit.resources import data_path
    from lorakit.toyworld.loras import recipe_hash, recipe_path
    from lorakit.training.blockwise import BlockwiseConfig

    make_dataset("generic", tmp_path / "reg", n=2, seed=0)
    base = [f"base_model={data_path('toy-base')}", f"data.path={data_path('toy', 'frog')}"]

    def h(*ov):
        return recipe_hash(load_config(BlockwiseConfig, recipe_path("frog"), [*base, *ov]))

    with_reg = h(f"data.reg_path={tmp_path / 'reg'}")
    assert with_reg != h("data.reg_path=null")
    (tmp_path / "reg" / "00000.txt").write_text("blue square, pink plain background\n")
    assert h(f"data.reg_path={tmp_path / 'reg'}") != with_reg  # content, not the path string


def test_cli_make_dataset_and_list(tmp_path, capsys):
    from lorakit.cli import main

    assert main(["toyworld", "make-dataset", "pixlor", "--out", str(tmp_path / "d"), "--n", "3"]) == 0
    caps = sorted(p.read_text().strip() for p in (tmp_path / "d").glob("*.txt"))
    assert len(caps) == 3 and all(c.endswith(", pixlor") for c in caps)
    assert main(["toyworld", "make-dataset", "generic", "--out", str(tmp_path / "r"), "--n", "2"]) == 0
    assert "regularisation" in capsys.readouterr().out
    assert main(["toyworld", "list", "--json"]) == 0
    assert '"trigger": "zorbo"' in capsys.readouterr().out
    assert main(["toyworld", "make-dataset", "dragon", "--out", str(tmp_path / "e")]) == 2
    assert "unknown toy-world concept 'dragon'" in capsys.readouterr().err
