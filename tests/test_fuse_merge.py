"""Weight merges (weighted / cat / svd / ties / dare) and the `lorakit fuse` command's adapter output."""

import json

import pytest
import torch

from lorakit.adapters.io import Adapter, LoraModule, load_adapter, save_adapter
from lorakit.fusion import merge


def _adapter(seed, keys, rank=3, conv=False):
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for k in keys:
        if conv and "conv" in k:
            mods[k] = LoraModule(torch.randn(rank, 6, 3, 3, generator=g), torch.randn(5, rank, 1, 1, generator=g), 2.0)
        else:
            mods[k] = LoraModule(torch.randn(rank, 7, generator=g), torch.randn(5, rank, generator=g), 1.5)
    return Adapter(modules=mods, metadata={"lorakit.base_arch": "sd1"})


KEYS = ["unet.a.to_q", "unet.b.to_k", "unet.c.conv1"]


@pytest.fixture
def adapters():
    a = _adapter(0, KEYS, rank=3, conv=True)
    b = _adapter(1, KEYS[:2] + ["unet.d.to_v"], rank=2, conv=True)
    return [a, b]


def _delta(mods, key):
    return mods[key].delta().double() if key in mods else 0.0


def test_cat_equals_weighted_sum_of_deltas_exactly(adapters):
    w = [0.7, -1.3]
    out = merge.cat(adapters, weights=w)
    assert set(out) == set(KEYS) | {"unet.d.to_v"}
    for key, mod in out.items():
        want = sum(wi * _delta(a.modules, key) for wi, a in zip(w, adapters))
        assert mod.rank == sum(a.modules[key].rank for a in adapters if key in a.modules)
        torch.testing.assert_close(mod.delta().double(), want, rtol=1e-6, atol=1e-6)
    assert out["unet.c.conv1"].down.shape == (3, 6, 3, 3) and out["unet.c.conv1"].up.shape == (5, 3, 1, 1)


def test_weighted_average_and_sum(adapters):
    avg = merge.weighted(adapters, weights=[1.0, 2.0])
    tot = merge.weighted(adapters, weights=[1.0, 2.0], combine="sum")
    for key in avg:
        want = _delta(adapters[0].modules, key) + 2.0 * _delta(adapters[1].modules, key)
        torch.testing.assert_close(tot[key].delta().double(), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(avg[key].delta().double(), want / 2, rtol=1e-6, atol=1e-6)


def test_svd_is_the_best_low_rank_approximation(adapters):
    out = merge.svd(adapters, rank=2)
    key = "unet.a.to_q"
    full = _delta(adapters[0].modules, key) + _delta(adapters[1].modules, key)
    s = torch.linalg.svdvals(full)
    err = torch.linalg.matrix_norm(out[key].delta().double() - full)
    assert out[key].rank == 2
    torch.testing.assert_close(err, s[2:].norm(), rtol=1e-5, atol=1e-6)  # Eckart-Young: the optimal rank-2 error


def test_ties_and_dare_match_peft_merge_utils(adapters):
    from peft.utils.merge_utils import dare_linear, ties

    key = "unet.b.to_k"
    deltas = [a.modules[key].delta().double() for a in adapters]
    w = torch.tensor([1.0, 0.5], dtype=torch.float64)
    big = 10  # rank >= min(out, in): the SVD step is exact
    out = merge.ties(adapters, weights=[1.0, 0.5], rank=big, density=0.4)
    torch.testing.assert_close(out[key].delta().double(), ties(deltas, w, 0.4), rtol=1e-5, atol=1e-6)
    d1 = merge.dare(adapters, weights=[1.0, 0.5], rank=big, density=0.6, seed=3)
    d2 = merge.dare(adapters, weights=[1.0, 0.5], rank=big, density=0.6, seed=3)
    torch.manual_seed(3)
    ref = {k: dare_linear([a.modules[k].delta().double() if k in a.modules else torch.zeros(5, 7, dtype=torch.float64)
                           for a in adapters], w, 0.6) for k in ["unet.a.to_q", "unet.b.to_k"]}
    torch.testing.assert_close(d1[key].delta(), d2[key].delta())  # seeded
    torch.testing.assert_close(d1[key].delta().double(), ref[key], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="density"):
        merge.ties(adapters, density=1.5)


def test_fuse_cli_cat_writes_exact_adapter(tmp_path, adapters):
    from lorakit.cli import main

    paths = []
    for i, a in enumerate(adapters):
        a.metadata["lorakit.trigger"] = f"concept{i}"
        paths.append(save_adapter(a, tmp_path / f"a{i}.safetensors"))
    out = tmp_path / "cat.safetensors"
    rc = main(["fuse", "--method", "cat", "--adapters", *map(str, paths), "--weights", "1", "0.5", "--out", str(out)])
    assert rc == 0
    got = load_adapter(out)
    assert got.metadata["lorakit.kind"] == "fused-delta"
    assert json.loads(got.metadata["lorakit.fusion"])["method"] == "cat"
    for key, mod in got.modules.items():
        want = _delta(adapters[0].modules, key) + 0.5 * _delta(adapters[1].modules, key)
        torch.testing.assert_close(mod.delta().double(), want, rtol=1e-5, atol=1e-5)
    report = json.loads((tmp_path / "cat.fusion.json").read_text())
    assert report["method"] == "cat" and [x["weight"] for x in report["inputs"]] == [1.0, 0.5]
    # --rank truncates; a wrong number of weights is a clear error
    assert main(["fuse", "--method", "weighted", "--adapters", *map(str, paths), "--rank", "1",
                 "--out", str(tmp_path / "w.safetensors")]) == 0
    assert {m.rank for m in load_adapter(tmp_path / "w.safetensors").modules.values()} == {1}
    assert main(["fuse", "--method", "cat", "--adapters", *map(str, paths), "--weights", "1",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
