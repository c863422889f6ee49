import os
import sys
from pathlib import Path

from lorakit.threads import configure_threads

# Before torch loads OpenMP: lorakit's defaults (passive waiting, one thread), whatever OMP_NUM_THREADS says, so the
# tests train the same bits everywhere; LORAKIT_TEST_THREADS=N to try another count.
THREADS = configure_threads(int(os.environ.get("LORAKIT_TEST_THREADS", "1")))

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# tools/*.py are scripts, not a package: tests that check a tool import it by name (`import bench_scale`).
sys.path.insert(0, str(ROOT / "tools"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _session_threads():
    """Every test (and the fixtures set up after it) runs on the session's torch thread count, whatever a tool's
    ``main`` or a test set before: tiny models run as fast on one thread, several times faster when other jobs
    share the cores, and the count changes float reduction order, hence the bits of what a test trains."""
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def toy_loras(request):
    """``{concept: file}`` of every held-out toy concept LoRA (its recipe ``train_configs/toy_<concept>.yaml``) from
    the toy LoRA cache shared with ``lorakit demo`` and ``.ci/run`` (``lorakit.toyworld.loras.default_cache_dir``).
    Missing ones are trained first (about a minute each on one idle core), with a line per LoRA on the terminal
    so a first run does not sit silent."""
    import time

    from lorakit.toyworld.concepts import HELDOUT
    from lorakit.toyworld.loras import concept_lora_path, default_cache_dir, train_concept_lora

    cache = default_cache_dir()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    names = [c.name for c in HELDOUT]
    missing = [n for n in names if not concept_lora_path(n, cache).exists()]

    def say(msg):
        with capture.global_and_fixture_disabled():
            print(msg, flush=True)

    if missing:
        say(f"\n[toy LoRAs] training {len(missing)} of {len(names)} into {cache} (cached for the next run; "
            f"`python tools/ci_artifacts.py --skip-hypernet --jobs 2` trains them two at a time)")
    files = {}
    for name in names:
        t0 = time.perf_counter()
        if name in missing:
            say(f"[toy LoRAs] {missing.index(name) + 1}/{len(missing)} {name} ...")
        files[name] = train_concept_lora(name, cache)
        if name in missing:
            say(f"[toy LoRAs] {name}: {files[name].name} in {time.perf_counter() - t0:.0f} s")
    return files


@pytest.fixture(scope="session")
def sd1_pipe():
    from lorakit.models import tiny_pipeline

    return tiny_pipeline("sd1", seed=0)


@pytest.fixture(scope="session")
def sdxl_pipe():
    from lorakit.models import tiny_pipeline

    return tiny_pipeline("sdxl", seed=0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
