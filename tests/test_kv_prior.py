"""network.kv_reg_strength: cross-attention key / value layers kept off the regularisation captions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.adapters.io import load_adapter
from lorakit.adapters.lora import LoraModule
from lorakit.training import kv_prior
from tests.test_train_blockwise import ROOT, make_images, run


def _gram(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


def test_the_new_delta_solves_its_least_squares_and_keeps_the_rank():
    g = torch.Generator().manual_seed(0)
    own, reg = torch.randn(300, 6, generator=g, dtype=torch.float64), torch.randn(200, 6, generator=g,
                                                                                     dtype=torch.float64)
    reg[:, 0] *= 5  # the regularisation tokens live mostly along one direction
    down, up = torch.randn(2, 6, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g,
                                                                                 dtype=torch.float64)
    delta = up @ down
    for strength in (0.3, 3.0):
        m = kv_prior.input_map(_gram(own), _gram(reg), strength)
        new = delta @ m
        # the gradient of mean_own |(D - delta) e|^2 + s mean_reg |D e|^2 vanishes at D = new
        grad = (new - delta) @ _gram(own) + strength * new @ _gram(reg)
        assert grad.abs().max() < 1e-8
        assert torch.linalg.matrix_rank(new) == 2
        on_reg = (reg @ new.T).pow(2).mean() / (reg @ delta.T).pow(2).mean()
        on_own = (own @ new.T).pow(2).mean() / (own @ delta.T).pow(2).mean()
        assert on_reg < on_own < 1
    assert torch.allclose(kv_prior.input_map(_gram(own), _gram(reg), 0.0), torch.eye(6, dtype=torch.float64))


def test_only_cross_attention_keys_and_values_change(sd1_pipe):
    unet = sd1_pipe.unet
    names = [f"unet.{n}" for n, _ in unet.named_modules() if n.endswith(("to_k", "to_v", "to_q"))]
    picked = kv_prior.kv_layer_names(unet, names)
    assert picked and all(".attn2.to_k" in n or ".attn2.to_v" in n for n in picked)
    assert len(picked) == len([n for n in names if ".attn2." in n and not n.endswith("to_q")])
    width = unet.config.cross_attention_dim
    modules = {n: LoraModule(down=torch.randn(2, unet.get_submodule(n[5:]).in_features),
                             up=torch.randn(unet.get_submodule(n[5:]).out_features, 2), alpha=2.0) for n in names}
    g = torch.Generator().manual_seed(1)
    own, reg = torch.randn(50, width, generator=g).double(), torch.randn(50, width, generator=g).double()
    out = kv_prior.keep_off_regularisation(modules, unet, _gram(own), _gram(reg), 1.0)
    for n in names:
        same = torch.equal(out[n].down, modules[n].down) and out[n].up is modules[n].up
        assert same == (n not in picked)
    only_q = {n: m for n, m in modules.items() if n.endswith("to_q")}
    with pytest.raises(ValueError, match="no cross-attention key / value layers"):
        kv_prior.keep_off_regularisation(only_q, unet, _gram(own), _gram(reg), 1.0)


def test_training_saves_the_kept_off_layers_and_leaves_the_rest(tmp_path, sd1_pipe):
    data = make_images(tmp_path / "img")
    reg = make_images(tmp_path / "reg", n=2, seed=1)
    for p in reg.glob("*.txt"):
        p.write_text("blue square, night background" if p.stem.endswith("0") else "green circle")
    common = ["max_steps=2", "learning_rate=1e-2", f"data.reg_path={reg}", "network.blocks=all",
              "data.caption_dropout=0"]
    plain = load_adapter(run(tmp_path, data, *common, name="plain").final_path)
    kept = load_adapter(run(tmp_path, data, *common, "network.kv_reg_strength=2.0", name="kept").final_path)
    assert set(plain.modules) == set(kept.modules)
    own_g = kv_prior.token_gram(sd1_pipe, ["zorbo, red circle, plain background"])
    reg_g = kv_prior.token_gram(sd1_pipe, ["blue square, night background", "green circle"])
    want = kv_prior.keep_off_regularisation(plain.modules, sd1_pipe.unet, own_g, reg_g, 2.0)
    changed = kv_prior.kv_layer_names(sd1_pipe.unet, plain.modules)
    assert changed
    for name, mod in kept.modules.items():
        assert torch.equal(mod.up, plain.modules[name].up)
        if name in changed:
            assert not torch.equal(mod.down, plain.modules[name].down)
            assert torch.allclose(mod.down, want[name].down, atol=1e-6, rtol=1e-5)
        else:
            assert torch.equal(mod.down, plain.modules[name].down)


def test_a_resumed_run_saves_the_same_kept_off_layers(tmp_path):
    data = make_images(tmp_path / "img")
    reg = make_images(tmp_path / "reg", n=2, seed=1)
    common = ["max_steps=3", "learning_rate=1e-2", f"data.reg_path={reg}", "network.kv_reg_strength=1.0",
              "data.caption_dropout=0"]
    full = run(tmp_path, data, *common, name="full")
    run(tmp_path, data, *common, "stop_at_step=1", name="split")
    resumed = run(tmp_path, data, *common, "resume=latest", name="split")
    a, b = load_adapter(full.final_path), load_adapter(resumed.final_path)
    assert a.modules.keys() == b.modules.keys()
    for name in a.modules:  # the checkpoint kept the layers as trained, so the resumed run ends where one run does
        assert torch.equal(a.modules[name].down, b.modules[name].down), name
        assert torch.equal(a.modules[name].up, b.modules[name].up), name


@pytest.mark.parametrize("extra, message", [
    ([], "network.kv_reg_strength=1.0 needs data.reg_path"),
    (["data.reg_path={reg}", "network.train_text_encoder=true"], "needs network.train_text_encoder: false"),
    (["network.kv_reg_strength=-1"], "expected 0 (off) or a positive weight"),
    (["data.reg_path={reg}", "network.target_modules=[attn1.to_q]", "max_steps=100000"],
     "no cross-attention key / value layers"),  # refused before training: 100000 steps would time out
])
def test_bad_settings_get_one_line_and_exit_2(tmp_path, extra, message):
    data = make_images(tmp_path / "img")
    reg = make_images(tmp_path / "reg", n=1)
    args = ["base_model=tiny:sd1", f"data.path={data}", f"output_dir={tmp_path / 'out'}", "logging=none",
            "network.kv_reg_strength=1.0", *[e.format(reg=reg) for e in extra]]
    proc = subprocess.run([sys.executable, str(ROOT / "train_blockwise.py"), "--config",
                           str(ROOT / "train_configs/toy_character.yaml"), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not Path(tmp_path / "out").exists() or not list(Path(tmp_path / "out").glob("*.safetensors"))


def test_a_strength_of_zero_hashes_as_a_recipe_without_the_key(tmp_path):
    from lorakit.config import load_config
    from lorakit.resources import data_path
    from lorakit.toyworld.dataset import make_dataset
    from lorakit.toyworld.loras import recipe_hash, recipe_path
    from lorakit.training.blockwise import BlockwiseConfig

    make_dataset("generic", tmp_path / "reg", n=2, seed=0)
    base = [f"base_model={data_path('toy-base')}", f"data.path={data_path('toy', 'frog')}",
            f"data.reg_path={tmp_path / 'reg'}"]

    def h(*ov):
        return recipe_hash(load_config(BlockwiseConfig, recipe_path("frog"), [*base, *ov]))

    assert h() == h("network.kv_reg_strength=0")  # the hashes published before the key existed stay valid
    assert h("network.kv_reg_strength=1.0") != h()
