"""tools/train_whole_scene_lora.py: the recipe's scenes with what the recipe takes out of them kept."""

from dataclasses import replace

import numpy as np
import pytest

import train_whole_scene_lora as tool


def _recipe(identity):
    from lorakit.toyworld.v2.scenes import concept_scene

    rng = np.random.default_rng(0)
    return [concept_scene(identity, rng) for _ in range(40)]


def test_background_variant_is_the_recipes_scenes_with_their_objects_kept():
    variant = tool.variant_scenes("nocturo")
    assert [replace(v, hat=None, mushroom=None) for v in variant] == _recipe("nocturo")
    assert sum(v.hat is not None for v in variant) == 7 and sum(v.mushroom is not None for v in variant) == 9


@pytest.mark.parametrize("identity", ["kwibbit", "bloopo"])
def test_character_variant_is_the_recipes_scenes_with_objects_and_style_kept(identity):
    variant = tool.variant_scenes(identity)
    assert [replace(v, hat=None, mushroom=None, style=None) for v in variant] == _recipe(identity)
    assert all(v.characters == (identity,) for v in variant)
    hats, mushrooms, styles = (sum(getattr(v, f) is not None for v in variant) for f in ("hat", "mushroom", "style"))
    assert hats > 0 and mushrooms > 0 and styles > 0


def test_an_object_or_style_is_one_line_and_exit_2(capsys):
    assert tool.main(["hattock"]) == 2
    err = capsys.readouterr().err
    assert "not a character or background identity" in err and len(err.strip().splitlines()) == 1
