"""tools/train_background_with_objects.py: the recipe's background scenes with the class scenes' objects kept."""

from dataclasses import replace

import numpy as np

import train_background_with_objects as tool


def test_variant_is_the_recipes_scenes_with_their_objects_kept():
    from lorakit.toyworld.v2.scenes import concept_scene

    rng = np.random.default_rng(0)
    recipe = [concept_scene("nocturo", rng) for _ in range(40)]
    variant = tool.variant_scenes("nocturo")
    assert [replace(v, hat=None, mushroom=None) for v in variant] == recipe
    assert sum(v.hat is not None for v in variant) == 7 and sum(v.mushroom is not None for v in variant) == 9


def test_a_non_background_is_one_line_and_exit_2(capsys):
    assert tool.main(["hattock"]) == 2
    err = capsys.readouterr().err
    assert "not a background identity" in err and len(err.strip().splitlines()) == 1
