"""A plain `pip install .` carries the toy world: the built wheel holds the base, the datasets, the oracle and the
concept recipes, and lorakit finds them through ``lorakit.resources`` (not through the clone's layout)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lorakit.resources import data_path, toy_recipe
from lorakit.toyworld.concepts import concepts_of_kind
from lorakit.toyworld.v2.demo import WORLD as DEMO_WORLD

REPO = Path(__file__).resolve().parents[1]


def _source_copy(tmp_path: Path) -> Path:
    """What a build reads (pyproject.toml, README.md, lorakit/ with the clone's links followed), copied under
    ``tmp_path``: setuptools writes build/ and *.egg-info next to its sources, which must not be the clone."""
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "lorakit", src / "lorakit", ignore=shutil.ignore_patterns("__pycache__"))
    return src


def test_resources_resolve_in_a_clone():
    assert (data_path("toy-base") / "model_index.json").is_file()
    assert (data_path("oracle") / "oracle.safetensors").is_file()
    for kind in ("character", "style", "object"):
        for c in concepts_of_kind(kind, heldout=True):
            assert toy_recipe(c.name).is_file(), c.name
            assert data_path("toy", c.name).is_dir(), c.name


@pytest.mark.slow
def test_wheel_bundles_the_toy_world(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(_source_copy(tmp_path)), "--no-deps",
                          "--no-build-isolation", "-q", "-w", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("lorakit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("lorakit/resources.py", "lorakit/_bundled/data/toy-base/model_index.json",
                   "lorakit/_bundled/data/toy-base/unet/diffusion_pytorch_model.safetensors",
                   "lorakit/_bundled/data/oracle/oracle.safetensors", "lorakit/_bundled/recipes/toy_frog.yaml",
                   "lorakit/_bundled/data/toy/generic/00000.txt",  # the recipes' regularisation images
                   "lorakit/_bundled/data/toy2-base/model_index.json",  # toy world v2's defaults
                   "lorakit/_bundled/data/toy2-oracle/oracle.safetensors", "lorakit/_bundled/recipes/toy2_kwibbit.yaml"):
        assert needed in names, needed
    # symlinks in the clone become real files in the wheel
    frog = zipfile.ZipFile(wheel).read("lorakit/_bundled/recipes/toy_frog.yaml").decode()
    assert frog == (REPO / "train_configs" / "toy_frog.yaml").read_text()


@pytest.mark.slow
def test_installed_package_runs_the_demo_from_another_folder(tmp_path):
    """`pip install .` (not editable) into a fresh virtual environment, then `lorakit demo` from a folder outside
    the clone, offline: the installed copy (not the clone) trains two toy LoRAs from its bundled recipes and data,
    composes and scores them. The environment sees the already installed dependencies (--system-site-packages),
    so nothing is downloaded; a short run (2 training steps, 1 image, 2 sampling steps) keeps it cheap."""
    import json
    import os
    import venv

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-build-isolation", "--no-index", "-q", str(_source_copy(tmp_path))],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LORAKIT_TOY_LORAS")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    where = subprocess.run([str(python), "-c", "import lorakit; print(lorakit.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True)
    assert Path(where.stdout.strip()).is_relative_to(env_dir), where.stdout + where.stderr
    # the package data resolve inside the environment, not the clone: base, oracle, recipes, v2 defaults
    files = subprocess.run([str(python), "-c", "from lorakit.resources import data_path, toy_recipe\n"
                            "for p in (data_path('toy-base', 'model_index.json'), data_path('oracle', 'config.json'),"
                            " toy_recipe('frog'), data_path('toy', 'frog'), data_path('toy2-base', 'model_index.json'),"
                            " data_path('toy2-oracle', 'oracle.safetensors')): print(p)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    paths = [Path(line) for line in files.stdout.splitlines()]
    assert len(paths) == 6, files.stdout + files.stderr
    for path in paths:
        assert path.is_relative_to(env_dir.resolve()) and path.exists(), path
    demo = subprocess.run([str(env_dir / "bin" / "lorakit"), "--quiet", "demo", "--steps", "2", "--k", "1",
                           "--sample-steps", "2", "--lora-dir", "loras", "--out", "out"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stderr[-3000:]
    report = json.loads((elsewhere / "out" / "report.json").read_text())
    defaults = {DEMO_WORLD.default_character, DEMO_WORLD.default_second}  # the v2 demo's pair (kwibbit, nocturo)
    assert set(report["loras"]) == defaults and len(list((elsewhere / "loras").glob("*.safetensors"))) == 2
    assert not (REPO / "loras").exists() and not (REPO / "out").exists()
