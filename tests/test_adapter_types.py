"""The adapter-type protocol: each type's delta against a formula written out here, and its exact LoRA form."""

import pytest
import torch

from lorakit.adapters.base import AdapterModule
from lorakit.adapters.locon import is_locon
from lorakit.adapters.loha import LohaModule
from lorakit.adapters.lokr import LokrModule
from lorakit.adapters.lora import LoraModule
from lorakit.adapters.registry import MODULE_TYPES, module_type_of, split_layer_key, unsupported_kind


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _r(*shape, g):
    return torch.randn(*shape, generator=g)


def tucker_by_hand(t, w_b, w_a):
    """[out, in, kh, kw]: slice (k, l) is w_a^T @ t[:, :, k, l] @ w_b."""
    out = torch.zeros(w_a.shape[1], w_b.shape[1], *t.shape[2:], dtype=torch.float64)
    for k in range(t.shape[2]):
        for l in range(t.shape[3]):
            out[:, :, k, l] = w_a.double().T @ t[:, :, k, l].double() @ w_b.double()
    return out


def kron_by_hand(w1, w2):
    """Kronecker product written with explicit indices: out[i*c + p, j*d + q, ...] = w1[i, j] * w2[p, q, ...]."""
    a, b = w1.shape
    c, d = w2.shape[:2]
    out = torch.zeros(a * c, b * d, *w2.shape[2:], dtype=torch.float64)
    for i in range(a):
        for j in range(b):
            out[i * c:(i + 1) * c, j * d:(j + 1) * d] = w1[i, j].double() * w2.double()
    return out


def test_every_type_follows_the_protocol():
    g = _g()
    mods = [LoraModule(_r(2, 5, g=g), _r(3, 2, g=g), 1.0),
            LohaModule(_r(3, 2, g=g), _r(2, 5, g=g), _r(3, 2, g=g), _r(2, 5, g=g), 1.0),
            LokrModule(w1=_r(2, 2, g=g), w2=_r(3, 4, g=g))]
    for mod in mods:
        assert isinstance(mod, AdapterModule)
        assert MODULE_TYPES[mod.kind] is type(mod)
        sd = mod.state_dict("lora_unet_x")
        parts = {split_layer_key(k)[1]: v for k, v in sd.items()}
        assert module_type_of(parts) is type(mod)
        again = type(mod).from_parts(parts)
        torch.testing.assert_close(again.delta(), mod.delta(), rtol=0, atol=0)


def test_lora_and_locon_delta():
    g = _g(1)
    down, up = _r(3, 4, 3, 3, g=g), _r(6, 3, 1, 1, g=g)
    mod = LoraModule(down, up, alpha=1.5)
    want = 0.5 * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    torch.testing.assert_close(mod.delta(), want, rtol=1e-6, atol=1e-6)
    assert is_locon(mod) and not is_locon(LoraModule(_r(3, 4, g=g), _r(6, 3, g=g), 3.0))
    assert mod.to_lora() is mod


@pytest.mark.parametrize("conv", [False, True])
def test_loha_delta_and_exact_lora(conv):
    g = _g(2)
    r, out, inn = 3, 6, 5
    k = 9 if conv else 1
    w1a, w1b, w2a, w2b = _r(out, r, g=g), _r(r, inn * k, g=g), _r(out, r, g=g), _r(r, inn * k, g=g)
    mod = LohaModule(w1a, w1b, w2a, w2b, alpha=2.0, kernel=(3, 3) if conv else None)
    want = torch.zeros(out, inn * k, dtype=torch.float64)
    for o in range(out):
        for i in range(inn * k):
            want[o, i] = (w1a[o] @ w1b[:, i]).double() * (w2a[o] @ w2b[:, i]).double() * 2.0 / 3
    want = want.reshape(out, inn, 3, 3) if conv else want
    torch.testing.assert_close(mod.delta().double(), want, rtol=1e-5, atol=1e-5)
    lora = mod.to_lora()
    assert lora.rank == r * r  # Khatri-Rao factors: exact at the rank bound, no decomposition
    torch.testing.assert_close(lora.delta(), mod.delta(), rtol=0, atol=1e-5)


def test_loha_tucker():
    g = _g(3)
    r = 2
    t1, t2 = _r(r, r, 3, 3, g=g), _r(r, r, 3, 3, g=g)
    w1a, w1b, w2a, w2b = _r(r, 6, g=g), _r(r, 4, g=g), _r(r, 6, g=g), _r(r, 4, g=g)
    mod = LohaModule(w1a, w1b, w2a, w2b, alpha=1.0, t1=t1, t2=t2)
    want = tucker_by_hand(t1, w1b, w1a) * tucker_by_hand(t2, w2b, w2a) * 0.5
    torch.testing.assert_close(mod.delta().double(), want, rtol=1e-5, atol=1e-5)
    assert mod.is_conv


def test_lokr_variants():
    g = _g(4)
    w1, w2 = _r(2, 3, g=g), _r(4, 5, g=g)
    full = LokrModule(w1=w1, w2=w2, alpha=7.0)  # both factors whole: no scale, alpha ignored (LyCORIS)
    torch.testing.assert_close(full.delta().double(), kron_by_hand(w1, w2), rtol=1e-6, atol=1e-6)
    w2a, w2b = _r(4, 2, g=g), _r(2, 5, g=g)
    low = LokrModule(w1=w1, w2_a=w2a, w2_b=w2b, alpha=1.0)
    torch.testing.assert_close(low.delta().double(), kron_by_hand(w1, w2a @ w2b) * 0.5, rtol=1e-6, atol=1e-6)
    w1a, w1b = _r(2, 1, g=g), _r(1, 3, g=g)
    both = LokrModule(w1_a=w1a, w1_b=w1b, w2_a=w2a, w2_b=w2b, alpha=3.0)  # scale from w2_b's rank
    torch.testing.assert_close(both.delta().double(), kron_by_hand(w1a @ w1b, w2a @ w2b) * 1.5, rtol=1e-5, atol=1e-5)
    conv_w2 = _r(4, 5, 3, 3, g=g)
    conv = LokrModule(w1=w1, w2=conv_w2)
    torch.testing.assert_close(conv.delta().double(), kron_by_hand(w1, conv_w2), rtol=1e-6, atol=1e-6)
    flat = LokrModule(w1=w1, w2_a=w2a, w2_b=_r(2, 45, g=g), alpha=2.0, kernel=(3, 3))
    w2_4d = (w2a @ flat.w2_b).reshape(4, 5, 3, 3)
    torch.testing.assert_close(flat.delta().double(), kron_by_hand(w1, w2_4d), rtol=1e-5, atol=1e-5)
    t2 = _r(2, 2, 3, 3, g=g)
    tucker = LokrModule(w1=w1, w2_a=_r(2, 4, g=g), w2_b=_r(2, 5, g=g), t2=t2, alpha=2.0)
    want = kron_by_hand(w1, tucker_by_hand(t2, tucker.w2_b, tucker.w2_a))
    torch.testing.assert_close(tucker.delta().double(), want, rtol=1e-5, atol=1e-5)
    for mod in (full, low, both, conv, flat, tucker):
        torch.testing.assert_close(mod.to_lora().delta(), mod.delta(), rtol=0, atol=1e-4 * mod.delta().abs().max())


def test_unsupported_kinds_are_named():
    assert unsupported_kind("lora_unet_x.oft_blocks") == "OFT"
    assert unsupported_kind("lora_unet_x.dora_scale") == "DoRA"
    assert unsupported_kind("lora_unet_x.lora_down.weight") is None


def test_weighted_merge_of_loha_lokr_and_lora_is_exact():
    from lorakit.adapters.io import Adapter
    from lorakit.fusion.merge import cat, weighted

    g = _g(7)
    key = "unet.down_blocks.0.attentions.0.proj_in"
    loha = LohaModule(_r(8, 2, g=g), _r(2, 6, g=g), _r(8, 2, g=g), _r(2, 6, g=g), alpha=1.0)
    lokr = LokrModule(w1=_r(2, 2, g=g), w2_a=_r(4, 1, g=g), w2_b=_r(1, 3, g=g), alpha=3.0)
    lora = LoraModule(_r(3, 6, g=g), _r(8, 3, g=g), alpha=1.5)
    ads = [Adapter({key: m}) for m in (loha, lokr, lora)]
    want = (0.5 * loha.delta() + 2.0 * lokr.delta() + 1.0 * lora.delta()) / 3
    got = weighted(ads, [0.5, 2.0, 1.0])[key].delta()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    torch.testing.assert_close(cat(ads, [0.5, 2.0, 1.0])[key].delta(), 3 * want, rtol=0, atol=1e-4)


def test_tucker_locon_folds_into_one_down_factor():
    """LyCORIS LoCon with use_tucker: up(mid(down(x))) as three convolutions equals one conv with the delta."""
    g = _g(9)
    r, cin, cout = 3, 4, 5
    down, mid, up = _r(r, cin, 1, 1, g=g), _r(r, r, 3, 3, g=g), _r(cout, r, 1, 1, g=g)
    mod = LoraModule.from_parts({"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up,
                                 "alpha": torch.tensor(1.5)})
    x = _r(2, cin, 7, 7, g=g)
    chain = torch.nn.functional.conv2d(torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down), mid, padding=1), up)
    one = torch.nn.functional.conv2d(x, mod.delta(), padding=1)
    torch.testing.assert_close(one, chain * 0.5, rtol=0, atol=1e-4)
