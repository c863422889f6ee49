"""A plain `pip install .` carries the toy world: the built wheel holds the base, the datasets, the oracle and the
concept recipes, and lorakit finds them through ``lorakit.resources`` (not through the clone's layout)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lorakit.resources import data_path, toy_recipe
from lorakit.toyworld.concepts import concepts_of_kind

REPO = Path(__file__).resolve().parents[1]


def test_resources_resolve_in_a_clone():
    assert (data_path("toy-base") / "model_index.json").is_file()
    assert (data_path("oracle") / "oracle.safetensors").is_file()
    for kind in ("character", "style", "object"):
        for c in concepts_of_kind(kind, heldout=True):
            assert toy_recipe(c.name).is_file(), c.name
            assert data_path("toy", c.name).is_dir(), c.name


@pytest.mark.slow
def test_wheel_bundles_the_toy_world(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("lorakit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("lorakit/resources.py", "lorakit/_bundled/data/toy-base/model_index.json",
                   "lorakit/_bundled/data/toy-base/unet/diffusion_pytorch_model.safetensors",
                   "lorakit/_bundled/data/oracle/oracle.safetensors", "lorakit/_bundled/recipes/toy_frog.yaml",
                   "lorakit/_bundled/data/toy/generic/00000.txt"):  # the recipes' regularisation images
        assert needed in names, needed
    # symlinks in the clone become real files in the wheel
    frog = zipfile.ZipFile(wheel).read("lorakit/_bundled/recipes/toy_frog.yaml").decode()
    assert frog == (REPO / "train_configs" / "toy_frog.yaml").read_text()
