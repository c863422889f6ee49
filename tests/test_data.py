"""Training data: captions, tag shuffle, dropout, buckets, repeats, regularisation, latent cache, bad files."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from lorakit.data import (
    BadImageError,
    CaptionedImages,
    DataConfig,
    DatasetError,
    LatentCache,
    bucket_sizes,
    collate,
    nearest_bucket,
    process_caption,
    scan_folder,
)


def _img(path, size=(32, 32), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_caption_files_and_metadata_jsonl(tmp_path):
    _img(tmp_path / "a" / "x.png")
    (tmp_path / "a" / "x.txt").write_text("zorbo, red\n")
    _img(tmp_path / "a" / "sub" / "y.jpg")  # no caption -> default
    recs = scan_folder(tmp_path / "a", default_caption="thing")
    assert sorted((r.path.name, r.caption, r.size) for r in recs) == [("x.png", "zorbo, red", (32, 32)), ("y.jpg", "thing", (32, 32))]
    _img(tmp_path / "b" / "p.png", (40, 24))
    (tmp_path / "b" / "metadata.jsonl").write_text(json.dumps({"file_name": "p.png", "text": "a cat"}) + "\n")
    (rec,) = scan_folder(tmp_path / "b")
    assert rec.caption == "a cat" and rec.size == (40, 24)


def test_tag_shuffle_keeps_tokens_and_dropout_rate():
    cap = "zorbo, red, circle, plain, big, small"
    outs = {process_caption(cap, True, 1, 0.0, torch.Generator().manual_seed(s)) for s in range(30)}
    assert len(outs) > 5
    for o in outs:
        tags = o.split(", ")
        assert tags[0] == "zorbo" and sorted(tags) == sorted(cap.split(", "))
    dropped = sum(process_caption(cap, False, 0, 0.3, torch.Generator().manual_seed(s)) == "" for s in range(400))
    assert 80 < dropped < 160  # ~ 0.3 * 400


def test_buckets_repeats_and_regularisation(tmp_path):
    _img(tmp_path / "d" / "wide.png", (64, 32))
    _img(tmp_path / "d" / "tall.png", (32, 64))
    _img(tmp_path / "d" / "sq.png", (48, 48))
    _img(tmp_path / "reg" / "r.png", (48, 48))
    sizes = bucket_sizes(32, 16, 64, 8)
    assert all(w * h <= 32 * 32 and w % 8 == 0 and h % 8 == 0 for w, h in sizes)
    assert nearest_bucket((64, 32), sizes)[0] > nearest_bucket((64, 32), sizes)[1]
    cfg = DataConfig(path=str(tmp_path / "d"), resolution=32, buckets=True, bucket_min=16, bucket_max=64,
                     bucket_step=8, repeats=2, reg_path=str(tmp_path / "reg"), reg_weight=0.5, reg_repeats=3)
    ds = CaptionedImages(cfg, seed=0)
    assert len(ds) == 3 * 2 + 3 and ds.num_images == 3 and ds.num_reg == 1
    groups = ds.buckets()
    assert len(groups) == 3 and sorted(len(g) for g in groups) == [2, 2, 5]
    for g in groups:
        batch = collate([ds.get_item(i, 7) for i in g])
        w, h = ds.targets[g[0]]
        assert batch["pixel_values"].shape == (len(g), 3, h, w)
        assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    weights = sorted(ds.get_item(i, 0)["loss_weight"].item() for i in range(len(ds)))
    assert weights == [0.5] * 3 + [1.0] * 6


def test_items_are_a_function_of_the_sample_id(tmp_path):
    for i in range(2):
        _img(tmp_path / f"{i}.png", (40, 32), (10 * i, 100, 50))
        (tmp_path / f"{i}.txt").write_text("a, b, c, d, e")
    cfg = DataConfig(path=str(tmp_path), resolution=32, shuffle_tags=True, random_flip=True, center_crop=False)
    ds = CaptionedImages(cfg, seed=1)
    a, b = ds.get_item(0, 5), ds.get_item(0, 5)
    assert a["caption"] == b["caption"] and torch.equal(a["pixel_values"], b["pixel_values"])
    assert len({ds.get_item(0, s)["caption"] for s in range(20)}) > 3


def test_bad_and_missing_inputs_are_named(tmp_path):
    _img(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(BadImageError, match="bad.png"):
        scan_folder(tmp_path)
    assert [r.path.name for r in scan_folder(tmp_path, on_bad_image="skip")] == ["ok.png"]
    (tmp_path / "none").mkdir()
    with pytest.raises(DatasetError, match="none"):
        scan_folder(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="missing"):
        scan_folder(tmp_path / "missing")


def test_latent_cache_reuses_files_and_matches_the_vae(tmp_path):
    from lorakit.models import tiny_vae

    torch.manual_seed(0)
    vae = tiny_vae().eval()
    for i in range(2):
        _img(tmp_path / "d" / f"{i}.png", (32, 32), (100 * i, 50, 200))
    ds = CaptionedImages(DataConfig(path=str(tmp_path / "d"), resolution=32, repeats=3), seed=0)
    cache = LatentCache(tmp_path / "cache", vae)
    assert cache.fill(ds, progress=False) == 2  # 2 files for 6 items (repeats share one file)
    assert LatentCache(tmp_path / "cache", vae).fill(ds, progress=False) == 0  # reused across runs
    ds.latent_cache = cache
    item = ds.get_item(3, 0)
    with torch.no_grad():
        ref = vae.encode(ds.center_view(3, False)[None]).latent_dist
    torch.testing.assert_close(item["latent_mean"], ref.mean[0])
    torch.testing.assert_close(item["latent_std"], ref.std[0])
    assert "pixel_values" not in item and cache.hits == 1
    # another VAE -> other cache files (no stale latents)
    torch.manual_seed(1)
    assert LatentCache(tmp_path / "cache", tiny_vae()).fill(ds, progress=False) == 2
