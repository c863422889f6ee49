"""tools/ci_artifacts.py: the CI-trained LoRAs and hypernetwork are cached by recipe hash (2-step trainings on the
real toy base, one thread)."""

import json
import os
import shutil
import time
from pathlib import Path

import bench_composition as bench
import ci_artifacts as ci
import pytest

from lorakit.fileio import load_safetensors, save_safetensors

ROOT = Path(__file__).resolve().parents[1]
if not (ROOT / "data" / "toy-base" / "model_index.json").exists():
    pytest.skip("needs the bundled toy base data/toy-base", allow_module_level=True)




def _records(capsys, stage):
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    return [r for r in lines if r.get("stage") == stage]


def _state(folder: Path):
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("toy_*.safetensors")}


@pytest.mark.slow  # three trainings on the toy base, ~14 s of CPU
def test_adapters_reused_retrained_and_stale_removed(tmp_path, capsys):
    out = tmp_path / "adapters"
    files = ci.train_adapters(out, ["max_steps=2"], ["frog", "ink"])
    recs = _records(capsys, "adapters")
    assert [r["action"] for r in recs] == ["trained", "trained"]
    assert files["frog"].name.startswith("toy_frog-") and files["frog"].suffix == ".safetensors"
    first = _state(out)
    assert sorted(first) == sorted(p.name for p in files.values())
    assert (out / "latent_cache").is_dir() and any((out / "latent_cache").iterdir())

    # Same recipe: the same files, not rewritten.
    again = ci.train_adapters(out, ["max_steps=2"], ["frog", "ink"])
    assert again == files
    assert [r["action"] for r in _records(capsys, "adapters")] == ["reused", "reused"]
    assert _state(out) == first

    # A file of an older hash: moved to stale/; an interrupted run's folder and .tmp: deleted; the lookup finds the
    # current one.
    stale = out / "toy_frog-0000000000000000.safetensors"
    shutil.copyfile(files["frog"], stale)  # carries the frog trigger too
    (out / "toy_frog-abcd1234").mkdir()
    shutil.copyfile(files["frog"], out / "toy_frog-abcd1234" / "toy_frog.safetensors")
    (out / "toy_frog-1111111111111111.tmp").write_bytes(b"x")
    running = out / "toy_frog-inprogress"  # a young temp folder: maybe another process's run, left alone
    running.mkdir()
    old = time.time() - ci.LEFTOVER_AGE_S - 60
    for p in (out / "toy_frog-abcd1234", out / "toy_frog-1111111111111111.tmp"):
        os.utime(p, (old, old))
    sidecar = out / (files["frog"].name + ".profile.json")  # the benchmark's cmlora profile cache: kept
    sidecar.write_text("{}")
    assert bench.find_adapters(out)["frog"] != files["frog"]  # the newest file would win without the clean-up
    ci.train_adapters(out, ["max_steps=2"], ["frog"])
    rec = _records(capsys, "adapters")[0]
    assert rec["action"] == "reused"
    assert sorted(rec["removed"]) == sorted([stale.name, "toy_frog-abcd1234", "toy_frog-1111111111111111.tmp"])
    assert sorted(p.name for p in out.iterdir()) == sorted([files["frog"].name, sidecar.name, files["ink"].name,
                                                           "latent_cache", running.name])
    running.rmdir()
    assert [p.name for p in (tmp_path / "stale" / "adapters").iterdir()] == [stale.name]
    assert bench.find_adapters(out) == files

    # A changed override: new hash, retrained, the old file moved to stale/.
    changed = ci.train_adapters(out, ["max_steps=3"], ["frog"])
    rec = _records(capsys, "adapters")[0]
    assert rec["action"] == "trained" and rec["removed"] == [files["frog"].name, sidecar.name]
    assert changed["frog"] != files["frog"] and changed["frog"].exists() and not files["frog"].exists()
    assert (tmp_path / "stale" / "adapters" / files["frog"].name).exists()
    assert (tmp_path / "stale" / "adapters" / sidecar.name).exists()  # a stale file's sidecar goes with it
    assert bench.find_adapters(out)["frog"] == changed["frog"]


@pytest.mark.slow  # 27-90 s in CI (2 processes / several trainings)
def test_hypernet_cached_by_recipe_and_input_hashes(tmp_path, capsys):
    # 2 worker processes make the same files as a serial run
    files = ci.train_adapters(tmp_path / "adapters", ["max_steps=2"], ["frog", "robot", "ink"], jobs=2)
    assert [r["action"] for r in _records(capsys, "adapters")] == ["trained"] * 3
    serial = ci.train_adapters(tmp_path / "serial", ["max_steps=2"], ["frog"])
    assert serial["frog"].name == files["frog"].name
    capsys.readouterr()
    out = tmp_path / "hypernet"
    h1 = ci.train_hypernet(files, out, ["max_steps=2"], ("robot", "ink"))
    rec = _records(capsys, "hypernet")[0]
    assert rec["action"] == "trained"
    assert rec["content"] == [files["frog"].name] and rec["style"] == [files["ink"].name]
    assert rec["held_out"] == [[files["robot"].name, files["ink"].name]]
    (row,) = rec["eval"]
    assert set(row) == {"content", "style", "sum", "init", "lorarar"} and row["sum"] > 0
    mtime = h1.stat().st_mtime_ns

    # Same recipe and inputs: reused; the hash does not depend on where the LoRAs are.
    assert ci.train_hypernet(files, out, ["max_steps=2"], ("robot", "ink")) == h1
    assert _records(capsys, "hypernet")[0]["action"] == "reused" and h1.stat().st_mtime_ns == mtime
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    copies = {n: Path(shutil.copy(p, moved / p.name)) for n, p in files.items()}
    assert ci.hypernet_hash(ci.hypernet_config(copies, ["max_steps=2"], ("robot", "ink"))) in h1.name
    # ... nor on the checkout they were trained in: each LoRA's references are the concept's images named by the
    # recipe, never the training folder recorded in the LoRA's metadata (another checkout's, possibly gone)
    cfg = ci.hypernet_config(files, ["max_steps=2"], ("robot", "ink"))
    for e in [*cfg.content, *cfg.style, *cfg.eval_pairs[0]]:
        name = Path(e.path).name.split("-")[0].removeprefix("toy_")
        assert Path(e.images) == ROOT / "data" / "toy" / name
    tensors, meta = load_safetensors(files["frog"])
    gone = json.loads(meta["lorakit.config"])
    gone["data"]["path"] = str(tmp_path / "another_checkout" / "data" / "toy" / "frog")
    save_safetensors(tensors, moved / files["frog"].name, {**meta, "lorakit.config": json.dumps(gone)})
    assert ci.hypernet_hash(ci.hypernet_config(copies, ["max_steps=2"], ("robot", "ink"))) in h1.name

    # Changed override -> new hash, retrained, old file moved to stale/; a changed input LoRA changes the hash too.
    h2 = ci.train_hypernet(files, out, ["max_steps=3"], ("robot", "ink"))
    rec = _records(capsys, "hypernet")[0]
    assert h2 != h1 and rec["action"] == "trained" and rec["removed"] == [h1.name]
    assert sorted(p.name for p in out.iterdir()) == [h2.name]
    assert [p.name for p in (tmp_path / "stale" / "hypernet").iterdir()] == [h1.name]
    other = ci.train_adapters(tmp_path / "adapters", ["max_steps=3"], ["frog"])
    assert ci.hypernet_hash(ci.hypernet_config({**files, **other}, ["max_steps=3"], ("robot", "ink"))) not in h2.name


def test_failing_stage_is_named(tmp_path, capsys):
    rc = ci.main(["--out", str(tmp_path), "--threads", "1", "--concepts", "frog", "--lora-override", "max_stepz=2",
                  "--skip-bench"])
    assert rc == 1
    err = _records(capsys, "adapters")[-1]["error"]
    assert "'frog'" in err and "max_stepz" in err and "max_steps" in err  # the config error names the closest key
    with pytest.raises(ci.StageError, match="held-out pair"):
        ci.split_loras({"frog": Path("f"), "ink": Path("i")}, ("ink", "frog"))


def test_v1_lookup_skips_toy_world_v2_loras(tmp_path):
    """`lorakit demo` writes v2 LoRAs (same trigger words) into the shared cache: the v1 benchmark must not take
    them for its concepts, however new they are."""
    import torch

    v1 = tmp_path / "toy_frog-1111111111111111.safetensors"
    save_safetensors({"w": torch.zeros(1)}, v1, {"lorakit.trigger": "kwibbit"})
    time.sleep(0.01)
    save_safetensors({"w": torch.zeros(1)}, tmp_path / "toy2_kwibbit-2222222222222222.safetensors",
                     {"lorakit.trigger": "kwibbit"})
    save_safetensors({"w": torch.zeros(1)}, tmp_path / "renamed.safetensors",
                     {"lorakit.trigger": "kwibbit", "lorakit.config": json.dumps({"base_model": "/x/data/toy2-base"})})
    now = time.time() + 5
    os.utime(tmp_path / "renamed.safetensors", (now, now))
    assert bench.find_adapters(tmp_path) == {"frog": v1}


def test_v2_sets_name_their_identities():
    assert ci.v2_identities(["n2-kwibbit-nocturo"]) == ["kwibbit", "nocturo"]
    with pytest.raises(ci.StageError, match="n2-kwibbit-nope"):
        ci.v2_identities(["n2-kwibbit-nope"])


@pytest.mark.slow  # two 2-step v2 trainings (their data rendered once), ~30 s of CPU
def test_v2_adapters_cached_in_the_demo_cache(tmp_path, capsys):
    out = tmp_path / "adapters"
    files = ci.start_v2_adapters(out, ["kwibbit"], ["max_steps=2"])()
    assert files["kwibbit"].name.startswith("toy2_kwibbit-")
    assert [r["action"] for r in _records(capsys, "adapters-v2")] == ["trained"]
    mtime = files["kwibbit"].stat().st_mtime_ns
    assert ci.start_v2_adapters(out, ["kwibbit"], ["max_steps=2"])() == files
    assert [r["action"] for r in _records(capsys, "adapters-v2")] == ["reused"]
    assert files["kwibbit"].stat().st_mtime_ns == mtime
    changed = ci.start_v2_adapters(out, ["kwibbit"], ["max_steps=3"])()
    rec = _records(capsys, "adapters-v2")[0]
    assert rec["action"] == "trained" and rec["removed"] == [files["kwibbit"].name]
    assert changed["kwibbit"] != files["kwibbit"] and (tmp_path / "stale" / "adapters" / files["kwibbit"].name).exists()
    assert bench.find_adapters(out) == {}  # never taken for the v1 frog


def test_one_pool_trains_v1_and_v2_with_v2_queued_first(tmp_path, monkeypatch):
    """With 2 jobs the v1 and v2 LoRAs share one worker pool, v2's first (nocturo's 1200 steps are the longest), so
    no worker idles at the stage boundary; both stages' files come back, each stage timed on its own."""
    from concurrent.futures import ThreadPoolExecutor

    import lorakit.toyworld.loras as v1_loras
    import lorakit.toyworld.v2.loras as v2_loras

    queued = []

    def fake(prefix):
        def train(name, out, *rest):
            queued.append(name)
            path = Path(out) / f"{prefix}{name}-0000.safetensors"
            path.write_bytes(b"x")
            return path
        return train

    monkeypatch.setattr(ci, "worker_pool", lambda jobs, threads: ThreadPoolExecutor(1))  # one worker: queue order
    monkeypatch.setattr(v1_loras, "train_concept_lora", fake("toy_"))
    monkeypatch.setattr(v2_loras, "train_identity_lora", fake("toy2_"))
    monkeypatch.setattr(ci, "check_adapter_lookup", lambda out, files: None)
    args = ci.parse_args(["--out", str(tmp_path), "--jobs", "2", "--concepts", "frog", "ink", "--v2-sets",
                          "n2-kwibbit-nocturo"])
    times, cpu = {}, {}

    def timed(name, fn):
        times[name] = 0.0
        return fn()

    files, v2_files = ci.train_all_adapters(args, tmp_path, timed, cpu)
    assert queued == ["kwibbit", "nocturo", "frog", "ink"]
    assert set(files) == {"frog", "ink"} and set(v2_files) == {"kwibbit", "nocturo"}
    assert set(times) == {"adapters", "adapters-v2"} and "adapters" in cpu
    queued.clear()
    one = ci.parse_args(["--out", str(tmp_path), "--jobs", "1", "--concepts", "frog", "--v2-sets", "n2-kwibbit-nocturo"])
    ci.train_all_adapters(one, tmp_path, timed, cpu)
    assert queued == ["frog", "kwibbit", "nocturo"]  # one job: v1 first, as before
