"""Regional sampling: box rounding (inside / center), units, empty-box warning, regions file errors."""

import copy
import warnings

import numpy as np
import pytest
import torch

from lorakit.sampling import SamplerSettings, generate, load_adapters
from lorakit.sampling.regional import Region, RegionSpec, box_mask, cell_range, load_regions, parse_regions, warn_empty_boxes


def _cols(mask):
    return torch.nonzero(mask.any(0)).flatten().tolist()


def test_inside_rounding_keeps_only_full_cells_center_keeps_centres():
    box = (0.0, 0.05, 1.0, 0.6)
    assert _cols(box_mask(box, 16, 16)) == list(range(1, 9))  # default: inside, as Mix-of-Show
    assert _cols(box_mask(box, 16, 16, "inside")) == list(range(1, 9))
    assert _cols(box_mask(box, 16, 16, "center")) == list(range(1, 10))
    # the reference's formula written out: ceil(start * n) .. floor(end * n)
    for start, end, n in [(0.05, 0.6, 16), (0.1, 0.93, 8), (0.33, 0.66, 4), (0.0, 1.0, 2)]:
        assert cell_range(start, end, n, "inside") == (int(np.ceil(start * n)), int(np.floor(end * n)))


def test_edges_on_cell_boundaries_keep_the_cell():
    # 96 / 320 * 10 is 3.0000000000000004 in floats; the cell boundary still counts as inside
    assert cell_range(96 / 320, 1.0, 10, "inside") == (3, 10)
    assert cell_range(0.25, 0.5, 16, "inside") == cell_range(0.25, 0.5, 16, "center") == (4, 8)
    # a box inside one cell: no cell under "inside", the cell whose centre it holds under "center"
    assert cell_range(0.40, 0.47, 8, "inside")[1] - cell_range(0.40, 0.47, 8, "inside")[0] == 0
    assert cell_range(0.40, 0.47, 8, "center") == (3, 4)
    with pytest.raises(ValueError, match="box_rounding"):
        cell_range(0.0, 1.0, 4, "nearest")


def test_units_are_explicit():
    px = parse_regions({"prompt": "g", "unit": "px", "regions": [{"box": [0, 8, 16, 32], "prompt": "r"}]}, 32, 16)
    assert px.regions[0].box == (0.0, 0.25, 1.0, 1.0)
    assert px.box_rounding == "inside"
    # a pixel box whose values are all <= 1 stays pixels (no guessing)
    tiny = parse_regions({"prompt": "g", "unit": "px", "regions": [{"box": [0, 0, 1, 1], "prompt": "r"}]}, 32, 32)
    assert tiny.regions[0].box == (0.0, 0.0, 1 / 32, 1 / 32)
    fr = parse_regions({"prompt": "g", "unit": "fraction", "box_rounding": "center",
                        "regions": [{"box": [0, 0, 0.5, 1], "prompt": "r"}]}, 32, 32)
    assert fr.regions[0].box == (0.0, 0.0, 0.5, 1.0) and fr.box_rounding == "center"
    with pytest.raises(ValueError, match="f.yaml: add 'unit: px' or 'unit: fraction'"):
        parse_regions({"prompt": "g", "regions": [{"box": [0, 0, 16, 32], "prompt": "r"}]}, 32, 32, "f.yaml")
    with pytest.raises(ValueError, match=r"f.yaml: regions\[0\]: box \[0, 0, 16, 40\] \(px\)"):
        parse_regions({"prompt": "g", "unit": "px", "regions": [{"box": [0, 0, 16, 40], "prompt": "r"}]}, 32, 32, "f.yaml")
    with pytest.raises(ValueError, match=r"regions\[1\]: box \[0, 0, 16, 32\] \(fraction\)"):
        parse_regions({"prompt": "g", "unit": "fraction", "regions": [{"box": [0, 0, 1, 1], "prompt": "a"},
                                                                      {"box": [0, 0, 16, 32], "prompt": "r"}]}, 32, 32)
    with pytest.raises(ValueError, match="unit must be px or fraction"):
        parse_regions({"prompt": "g", "unit": "percent", "regions": []}, 32, 32)
    with pytest.raises(ValueError, match="box_rounding must be one of inside, center"):
        parse_regions({"prompt": "g", "box_rounding": "round", "regions": []}, 32, 32)
    with pytest.raises(ValueError, match=r"regions\[0\]: unknown keys \['weight'\]"):
        parse_regions({"prompt": "g", "unit": "px", "regions": [{"box": [0, 0, 1, 1], "prompt": "r", "weight": 2}]}, 32, 32)


def test_bad_yaml_file_is_one_line(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("prompt: [unclosed\n")
    with pytest.raises(ValueError, match="r.yaml: not a readable YAML mapping") as err:
        load_regions(f, 32, 32)
    assert "\n" not in str(err.value)


def test_empty_box_warns():
    spec = RegionSpec(prompt="g", regions=[Region((0.0, 0.0, 1.0, 1.0), "a"), Region((0.40, 0.40, 0.47, 0.47), "b")],
                      source="r.yaml")
    with pytest.warns(UserWarning, match=r"r.yaml: regions\[1\] .* covers no cell of the 8x8 latent"):
        assert warn_empty_boxes(spec, 8, 8) == [1]
    spec.box_rounding = "center"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_empty_boxes(spec, 8, 8) == []


def test_rounding_changes_the_image_and_small_box_warns_in_generate(sd1_pipe, tmp_path):
    from lorakit.adapters.io import save_adapter
    from lorakit.testing import random_adapter

    pipe = copy.deepcopy(sd1_pipe)
    f = save_adapter(random_adapter(pipe, seed=1, std=0.2), tmp_path / "a.safetensors")
    ads = load_adapters(pipe, [f])
    st = SamplerSettings(method="merge", steps=2, cfg=5.0)
    h = pipe.unet.config.sample_size  # latent cells per side
    off_grid = (0.0, 0.5 / h, 1.0, 0.5 + 0.5 / h)  # edges in the middle of cells: the rules differ
    lat = {}
    for rounding in ("inside", "center"):
        spec = RegionSpec("a blue dog", regions=[Region(off_grid, "a red cat")], box_rounding=rounding)
        lat[rounding], _ = generate(pipe, ads, st, "", "", [2], regions=spec, output_type="latent")
    assert (lat["inside"] - lat["center"]).abs().max() > 1e-4
    plain, _ = generate(pipe, ads, st, "a blue dog", "", [2], output_type="latent")
    small = RegionSpec("a blue dog", regions=[Region((0.0, 0.1 / h, 1.0, 0.9 / h), "a red cat")])
    with pytest.warns(UserWarning, match="covers no cell"):
        got, _ = generate(pipe, ads, st, "", "", [2], regions=small, output_type="latent")
    assert torch.equal(got, plain)
