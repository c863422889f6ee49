"""The v2 measurement's image store (lorakit.toyworld.v2.image_store): images kept on disk are read back pixel for
pixel, a partly stored batch is generated whole, and a run stops before its deadline and continues when run again."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.toyworld.evaluate import generate
from lorakit.toyworld.v2.image_store import OutOfTime, StoredPipe


class FakePipe:
    """Images that depend on the prompt, the seed and the batch (as float noise in a real batched pipeline may)."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, num_inference_steps, guidance_scale, generator, **kw):
        self.calls.append(list(prompts))
        out = []
        for p, g in zip(prompts, generator):
            rng = np.random.default_rng([g.initial_seed(), len(p), len(prompts), num_inference_steps])
            out.append(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
        return type("Out", (), {"images": out})()


def _px(imgs):
    return [np.asarray(i) for i in imgs]


def test_stored_images_are_read_back_exactly_and_partial_batches_regenerated(tmp_path):
    prompts = [f"red frog {i}" for i in range(5)]
    plain = generate(FakePipe(), prompts, seed=3, steps=2, guidance=4.0, batch=2)
    fake = FakePipe()
    store = StoredPipe(fake, tmp_path / "s")
    first = generate(store, prompts, seed=3, steps=2, guidance=4.0, batch=2)
    assert all(np.array_equal(a, b) for a, b in zip(_px(plain), _px(first)))
    assert len(fake.calls) == 3 and len(list((tmp_path / "s").glob("*.png"))) == 5
    again = generate(store, prompts, seed=3, steps=2, guidance=4.0, batch=2)
    assert len(fake.calls) == 3 and all(np.array_equal(a, b) for a, b in zip(_px(plain), _px(again)))
    sorted((tmp_path / "s").glob("*.png"))[0].unlink()
    generate(store, prompts, seed=3, steps=2, guidance=4.0, batch=2)
    assert len(fake.calls) == 4 and len(fake.calls[-1]) in (1, 2)  # only the batch that lost an image, whole
    other = generate(store, prompts, seed=3, steps=3, guidance=4.0, batch=2)  # another step count: new images
    assert len(fake.calls) == 7 and not all(np.array_equal(a, b) for a, b in zip(_px(plain), _px(other)))


def test_stops_before_the_deadline_and_continues(tmp_path):
    prompts = [f"blue robot {i}" for i in range(6)]
    now, fake = [0.0], FakePipe()

    def slow(*a, **k):  # each batch takes 4 s; the deadline is 9 s
        now[0] += 4.0
        return fake(*a, **k)

    store = StoredPipe(slow, tmp_path, deadline=9.0, clock=lambda: now[0])
    with pytest.raises(OutOfTime, match="4 new images"):
        generate(store, prompts, seed=0, steps=2, guidance=4.0, batch=2)  # third batch would end at 12 s
    fake = FakePipe()
    rest = generate(StoredPipe(fake, tmp_path), prompts, seed=0, steps=2, guidance=4.0, batch=2)
    assert fake.calls == [prompts[4:]]
    whole = generate(FakePipe(), prompts, seed=0, steps=2, guidance=4.0, batch=2)
    assert all(np.array_equal(a, b) for a, b in zip(_px(rest), _px(whole)))


def test_pipeline_tag_changes_with_the_adapter_bytes_and_scale(tmp_path):
    from safetensors.torch import save_file

    from lorakit.toyworld.v2.image_store import pipeline_tag

    (tmp_path / "unet").mkdir()
    save_file({"w": torch.zeros(2)}, tmp_path / "unet" / "m.safetensors")
    save_file({"a": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"a": torch.ones(2)}, tmp_path / "b.safetensors")
    base = pipeline_tag(tmp_path)
    assert base.startswith("base-") and pipeline_tag(tmp_path) == base
    tags = {pipeline_tag(tmp_path, tmp_path / f, s) for f in ("a.safetensors", "b.safetensors") for s in (0.8, 1)}
    assert len(tags) == 4 and all(t.startswith(base + "-lora-") for t in tags)
    save_file({"w": torch.ones(2)}, tmp_path / "unet" / "m.safetensors")
    assert pipeline_tag(tmp_path) != base


def test_measure_tool_budget_needs_a_store(capsys):
    import importlib

    from lorakit.errors import run_guarded

    tool = importlib.import_module("measure_toyworld")  # tools/ is on sys.path (conftest)
    rc = run_guarded(lambda: tool.main(["--world", "v2", "--oracle", "o", "--budget-s", "5"]), "m")
    assert rc == 2 and "--budget-s needs --image-store" in capsys.readouterr().err


@pytest.mark.slow
def test_measure_identities_with_a_store_gives_the_same_rows_and_resumes(tmp_path, monkeypatch):
    import json

    from safetensors.torch import save_file

    from lorakit.toyworld.v2 import measure
    from lorakit.toyworld.v2.concepts import CONCEPTS
    from lorakit.toyworld.v2.models import build_toy_pipeline
    from lorakit.toyworld.v2.oracle import Oracle, OracleNet

    monkeypatch.setattr(measure, "NUM_STEPS", 2)
    build_toy_pipeline(0).save_pretrained(tmp_path / "pipe")
    (tmp_path / "oracle").mkdir()
    torch.manual_seed(0)
    save_file(OracleNet(len(CONCEPTS)).state_dict(), tmp_path / "oracle" / "oracle.safetensors")
    (tmp_path / "oracle" / "config.json").write_text(json.dumps({"world": "v2", "concepts": list(CONCEPTS)}))
    oracle, work, over = Oracle.load(tmp_path / "oracle"), tmp_path / "work", ["max_steps=1", "train_batch_size=2"]
    plain = measure.measure_identities(["hattock"], tmp_path / "pipe", oracle, 3, 0.8, work, over)
    with pytest.raises(OutOfTime):  # a deadline already passed: stops before the first batch
        measure.measure_identities(["hattock"], tmp_path / "pipe", oracle, 3, 0.8, work, over,
                                   store=tmp_path / "s", deadline=-1e9)
    rows = measure.measure_identities(["hattock"], tmp_path / "pipe", oracle, 3, 0.8, work, over, store=tmp_path / "s")
    assert rows == plain
    assert sorted(p.name.split("-lora-")[0] != p.name for p in (tmp_path / "s").iterdir()) == [False, True]


def test_smaller_n_prompts_are_the_first_of_larger_n():
    """A measurement at n = 16 is the first batch of one at n = 32 (what lets the store continue it)."""
    from lorakit.toyworld.v2.evaluate import identity_prompts, world_prompts
    from lorakit.toyworld.v2.measure import IDENTITY_PROMPT_SEED, WORLD_PROMPT_SEED

    small, big = (identity_prompts("kwibbit", n, IDENTITY_PROMPT_SEED) for n in (16, 32))
    assert [t[:2] for t in small] == [t[:2] for t in big[:16]]
    small, big = (world_prompts(n, WORLD_PROMPT_SEED) for n in (16, 32))
    assert [p for p, _ in small] == [p for p, _ in big[:16]]
