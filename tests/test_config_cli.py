import json
from dataclasses import dataclass, field

import pytest

from lorakit.cli import main
from lorakit.config import ConfigError, NetworkConfig, load_config
from lorakit.adapters.io import save_adapter
from lorakit.testing import random_adapter


@dataclass
class _Schema:
    base_model: str = "x"
    max_steps: int = 10
    network: NetworkConfig = field(default_factory=NetworkConfig)


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("max_steps: 20\nnetwork:\n  rank: 8\n  blocks: {IN0: 4, OUT3: 4}\n")
    cfg = load_config(_Schema, f, ["network.alpha=2", "max_steps=30"])
    assert cfg.max_steps == 30 and cfg.network.rank == 8 and cfg.network.alpha == 2.0
    assert dict(cfg.network.blocks) == {"IN0": 4, "OUT3": 4}


def test_unknown_key_names_closest(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("network:\n  rnak: 8\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'network.rnak'; did you mean 'network.rank'"):
        load_config(_Schema, f)
    with pytest.raises(ConfigError, match=r"override 'max_step=3'.*did you mean 'max_steps'"):
        load_config(_Schema, None, ["max_step=3"])
    with pytest.raises(ConfigError, match="bad value"):
        load_config(_Schema, None, ["max_steps=lots"])


def test_inspect_reports_blocks_and_fit(sd1_pipe, sdxl_pipe, tmp_path, capsys):
    from lorakit.models import save_pipeline

    adapter = random_adapter(sd1_pipe, blocks="upper", network="locon", conv_rank=2)
    adapter.metadata["lorakit.trigger"] = "<hero>"
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "locon" and report["arch"] == "sd1" and report["trigger"] == "<hero>"
    assert set(report["blocks"]) == {"IN01", "IN02", "IN03", "OUT09", "OUT10", "OUT11"}
    assert report["parameters"] == adapter.num_parameters()
    xl_base = save_pipeline(sdxl_pipe, tmp_path / "xl")
    assert main(["inspect", str(path), "--base", str(xl_base)]) == 1  # a check that fails, not a usage error
    assert "adapter is for sd1 but the base model is sdxl" in capsys.readouterr().out


def test_train_overrides_after_config_reach_the_trainer(monkeypatch):
    """`lorakit train edlora --config X key=value` (overrides after the option) passes the overrides on."""
    import lorakit.training.entry as entry

    seen = {}
    monkeypatch.setattr(entry, "main", lambda name, argv: seen.setdefault("argv", (name, argv)) and 0)
    assert main(["train", "blockwise", "--config", "r.yaml", "max_steps=3", "seed=1"]) == 0
    assert seen["argv"] == ("blockwise", ["--config", "r.yaml", "max_steps=3", "seed=1"])
    with pytest.raises(SystemExit):
        main(["train", "blockwise", "--config", "r.yaml", "--bogus"])
