import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
