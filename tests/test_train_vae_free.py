"""The block-wise trainer frees the VAE encoder of a base it loaded itself once every latent is cached."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import lorakit.models
from lorakit.config import load_config
from lorakit.fileio import load_safetensors
from lorakit.training.blockwise import BlockwiseConfig, train


def _cfg(tmp_path, name, *extra):
    data = tmp_path / "img"
    if not data.exists():
        data.mkdir()
        rng = np.random.default_rng(0)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
            (data / f"{i}.txt").write_text("a red circle")
    return load_config(BlockwiseConfig, None, [
        "base_model=tiny:sd1", f"data.path={data}", f"output_dir={tmp_path / name}", "max_steps=2", "logging=none",
        "checkpointing_steps=0", "data.resolution=32", "data.cache_latents=true", "seed=1", *extra])


@pytest.mark.slow  # three short trainings
def test_encoder_freed_only_for_an_owned_base_and_the_adapter_is_unchanged(tmp_path, monkeypatch):
    owned = lorakit.models.tiny_pipeline("sd1", seed=0)
    monkeypatch.setattr(lorakit.models, "load_base", lambda *a, **k: owned)
    a = train(_cfg(tmp_path, "owned"))
    assert owned.vae.encoder is None and owned.vae.decoder is not None  # sampling still decodes

    given = lorakit.models.tiny_pipeline("sd1", seed=0)
    b = train(_cfg(tmp_path, "given"), pipe=given)
    assert given.vae.encoder is not None  # a pipeline passed in stays whole
    ta, tb = load_safetensors(a.final_path)[0], load_safetensors(b.final_path)[0]
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0)

    # Without the latent cache the encoder is needed every step and stays.
    kept = lorakit.models.tiny_pipeline("sd1", seed=0)
    monkeypatch.setattr(lorakit.models, "load_base", lambda *a, **k: kept)
    train(_cfg(tmp_path, "nocache", "data.cache_latents=false"))
    assert kept.vae.encoder is not None


def test_a_latent_lost_after_the_encoder_was_freed_is_named(tmp_path):
    from lorakit.data import CaptionedImages, LatentCache

    cfg = _cfg(tmp_path, "x")
    pipe = lorakit.models.tiny_pipeline("sd1", seed=0)
    ds = CaptionedImages(cfg.data, seed=0)
    cache = LatentCache(tmp_path / "cache", pipe.vae, torch.device("cpu"), torch.float32)
    cache.fill(ds, (False,), progress=False)
    assert cache.complete(ds, (False,)) and not cache.complete(ds, (False, True))
    pipe.vae.encoder = None
    cache.path_for(ds, 0, False).unlink()
    with pytest.raises(FileNotFoundError, match="disappeared during training"):
        cache.get(ds, 0, False)
