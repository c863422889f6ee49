import os

# Before torch loads OpenMP: busy-waiting threads made 2-thread runs 10-100x slower whenever another process held
# the second core (measured on the 2-core CI machine). The test models are tiny, so one thread is the fast choice.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(int(os.environ.get("LORAKIT_TEST_THREADS", "1")))


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
