"""lorakit sample / profile end to end: PNG + sidecar, same seed -> same bytes, regenerate, 2 processes == 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.adapters.io import save_adapter
from lorakit.cli import main
from lorakit.sampling import SampleJob, SamplerSettings, regenerate, run_sample
from lorakit.testing import random_adapter


@pytest.fixture(scope="module")
def files(tmp_path_factory, sd1_pipe):
    root = tmp_path_factory.mktemp("cli_adapters")
    return [
        str(save_adapter(random_adapter(sd1_pipe, seed=10 + k, text_encoder=True, std=0.2), root / f"ad{k}.safetensors"))
        for k in range(2)
    ]


def _job(files, out, **kw):
    sampler = SamplerSettings(**{"method": "cmlora", "steps": 3, "cfg": 4.0, "cmlora_order": "given", "cmlora_interval": 2, **kw})
    return SampleJob(base="tiny:sd1", adapters=files, out_dir=str(out), prompts=["a red cat"], seed=3, num_images=2,
                     sampler=sampler)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, files):
    return run_sample(_job(files, tmp_path_factory.mktemp("one")), progress=False)


def test_same_seed_same_png_bytes_and_regenerate(tmp_path, files, one_process):
    a = one_process
    b = run_sample(_job(files, tmp_path / "b"), progress=False)
    assert [p.name for p in a] == ["000-0000-s3.png", "000-0001-s4.png"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert a[0].read_bytes() != a[1].read_bytes()  # another seed, another image
    side = json.loads(a[1].with_suffix(".json").read_text())
    assert side["seed"] == 4 and side["sampler"]["method"] == "cmlora" and len(side["adapters"]) == 2
    assert side["schedule"]["passes"]["full"] + side["schedule"]["passes"]["shallow"] == 2 * 3
    again = regenerate(a[1].with_suffix(".json"), tmp_path / "regen")
    assert again.read_bytes() == a[1].read_bytes()


def test_cli_errors_are_named(tmp_path, files, capsys):
    assert main(["sample", "--base", "tiny:sd1", "--adapters", str(tmp_path / "nope.safetensors"), "--prompt", "x",
                 "--out", str(tmp_path)]) == 2
    assert "nope.safetensors" in capsys.readouterr().err
    assert main(["sample", "--base", "tiny:sd1", "--adapters", files[0], "--prompt", "x", "--size", "33",
                 "--out", str(tmp_path)]) == 2
    assert "multiple of 8" in capsys.readouterr().err
    assert main(["sample", "--base", "tiny:sd1", "--adapters", files[0], "--kinds", "hero", "--prompt", "x",
                 "--out", str(tmp_path)]) == 2
    assert "hero" in capsys.readouterr().err
    assert main(["sample", "--base", "tiny:sd1", "--adapters", files[0], "--method", "cmlora", "--cmlora-mode",
                 "official", "--uncond", "base", "--prompt", "x", "--out", str(tmp_path)]) == 2
    assert "official" in capsys.readouterr().err
    out = tmp_path / "masks"  # --masks attention: a trigger missing from the prompt fails before any image
    assert main(["sample", "--base", "tiny:sd1", "--adapters", files[0], "--method", "delta", "--masks", "attention",
                 "--triggers", "kwibbit", "--prompt", "a frog, night", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "trigger 'kwibbit' is in no comma tag" in err and "Traceback" not in err and not out.exists()
    # --prompt-parts class-words: a tag that is only a trigger leaves the base no class word
    assert main(["sample", "--base", "tiny:sd1", "--adapters", files[0], "--method", "delta", "--prompt-parts",
                 "class-words", "--triggers", "kwibbit", "--prompt", "kwibbit, night", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'kwibbit' holds only trigger words" in err and "Traceback" not in err and not out.exists()


def test_kinds_give_the_category_order(tmp_path, files):
    job = _job(files, tmp_path, cmlora_order="auto", steps=2)
    job.kinds, job.num_images = ["style", "character"], 1
    side = json.loads(run_sample(job, progress=False)[0].with_suffix(".json").read_text())
    assert side["profile"]["by"] == "category" and side["kinds"] == ["style", "character"]
    names = [a["name"] for a in side["adapters"]]
    assert side["schedule"]["order"] == [names[1], names[0]]  # the character first


@pytest.mark.slow  # 13.3 s of CPU in the fast suite (2026-12-03, one thread, loaded machine)
def test_file_metadata_gives_the_category_order_else_frequency(tmp_path, sd1_pipe):
    # no --kinds: each file's lorakit.category decides; one file without it -> lorakit's frequency order
    paths = []
    for k, kind in enumerate(["style", "character", None]):
        ad = random_adapter(sd1_pipe, seed=40 + k, std=0.2)
        if kind:
            ad.metadata["lorakit.category"] = kind
        paths.append(str(save_adapter(ad, tmp_path / f"m{k}.safetensors")))
    job = _job(paths[:2], tmp_path / "meta", cmlora_order="auto", steps=2)
    job.num_images = 1
    side = json.loads(run_sample(job, progress=False)[0].with_suffix(".json").read_text())
    names = [a["name"] for a in side["adapters"]]
    assert side["profile"]["by"] == "category" and side["schedule"]["order"] == [names[1], names[0]]
    job = _job(paths, tmp_path / "freq", cmlora_order="auto", steps=2)
    job.num_images, job.profile_steps, job.profile_seeds = 1, 2, [0]
    side = json.loads(run_sample(job, progress=False)[0].with_suffix(".json").read_text())
    assert side["profile"]["by"] == "frequency" and len(side["profile"]["scores"]) == 3
    official = _job(paths, tmp_path / "off", cmlora_order="auto", cmlora_mode="official", steps=2)
    official.num_images = 1
    side = json.loads(run_sample(official, progress=False)[0].with_suffix(".json").read_text())
    assert side["profile"]["by"] == "given"  # the official code has no other order


def test_profile_cli_writes_cache(tmp_path, files, capsys):
    args = ["profile", *files, "--base", "tiny:sd1", "--steps", "2", "--seeds", "0", "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert all(Path(f + ".profile.json").exists() for f in files)
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert all(not first[f]["cached"] and second[f]["cached"] for f in files)
    assert [second[f]["score"] for f in files] == [first[f]["score"] for f in files]
    assert sorted(r["rank"] for r in second.values()) == [0, 1]


@pytest.mark.slow  # 27-90 s in CI (2 processes / several trainings)
def test_two_processes_write_the_same_images(tmp_path, files, one_process):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
         "--module", "lorakit.cli", "sample", "--base", "tiny:sd1", "--adapters", *files, "--method", "cmlora",
         "--cmlora-order", "given", "--cmlora-interval", "2", "--steps", "3", "--cfg", "4.0", "--prompt", "a red cat",
         "--seed", "3", "--num-images", "2", "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    for png in one_process:
        other = tmp_path / "two" / png.name
        assert other.read_bytes() == png.read_bytes(), png.name
        assert json.loads(other.with_suffix(".json").read_text()) == json.loads(png.with_suffix(".json").read_text())
