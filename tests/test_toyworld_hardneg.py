"""Hard negatives of the toy oracle (lorakit.toyworld.hardneg) and the statistics helpers (lorakit.eval.stats)."""

import numpy as np
import pytest

from lorakit.eval.stats import fmt_rate, mcnemar_exact, paired, rate, wilson
from lorakit.toyworld.concepts import HELDOUT
from lorakit.toyworld.hardneg import FAMILIES, PALETTES, PART_KEEPS, hard_negatives
from lorakit.toyworld.render import PARTS, Scene, render


@pytest.mark.parametrize("name", [c.name for c in HELDOUT])
def test_hard_negatives_are_seeded_images_of_every_family(name):
    a, b = hard_negatives(name, 9, seed=3), hard_negatives(name, 9, seed=3)
    assert [f for _, f, _ in a] == list(FAMILIES) * 3
    assert all(im.size == (32, 32) and im.mode == "RGB" for im, _, _ in a)
    assert all(np.array_equal(np.asarray(x[0]), np.asarray(y[0])) for x, y in zip(a, b))
    other = hard_negatives(name, 9, seed=4)
    assert any(not np.array_equal(np.asarray(x[0]), np.asarray(y[0])) for x, y in zip(a, other))
    assert name in PALETTES


def test_parts_leave_out_what_makes_the_sprite():
    for name, keeps in PART_KEEPS.items():
        for keep in keeps:
            assert set(keep) < set(PARTS[name])  # never the whole sprite
    full = np.asarray(render(Scene(characters=("frog",), seed=1)))
    assert (np.abs(full.astype(int) - [255, 255, 255]).max(-1) < 30).any()  # the white eyes are drawn
    body_only = [im for im, f, what in hard_negatives("frog", 6, seed=1) if what == "frog with only body+belly"][0]
    arr = np.asarray(body_only).astype(int)
    assert not (np.abs(arr - [255, 255, 255]).max(-1) < 30).any()  # no eyes
    assert ((arr[..., 1] > 150) & (arr[..., 0] < 120)).any()  # the green body is there
    with pytest.raises(ValueError, match="held-out concepts only"):
        hard_negatives("circle", 3)


def test_default_sprites_are_unchanged_by_parts():
    # omit=() is the default: a full frog has the mouth's red and the body's green
    arr = np.asarray(render(Scene(characters=("frog",), seed=2))).astype(int)
    assert ((arr[..., 0] > 150) & (arr[..., 1] < 80)).any() and ((arr[..., 1] > 150) & (arr[..., 0] < 120)).any()


def test_wilson_and_paired_tests():
    lo, hi = wilson(48, 64)
    assert lo < 0.75 < hi and hi - lo < 0.25
    assert wilson(0, 0) == (0.0, 1.0) and wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 2**10)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(3, 7) == mcnemar_exact(7, 3)
    r = paired([True, True, False, True], [False, True, False, False])
    assert r == {"pairs": 4, "wins": 2, "losses": 0, "p": 0.5}
    with pytest.raises(ValueError, match="same items"):
        paired([True], [True, False])
    assert rate(3, 4)["wilson95"][0] < 0.75 and fmt_rate(3, 4).startswith("0.75 [")
