"""A new fusion method or sampler is one registry entry: the command line offers it, with its settings' flags,
help and defaults, without a change under lorakit/commands/."""

import argparse
from dataclasses import dataclass

import pytest

from lorakit.cli import build_parser
from lorakit.fusion import registry as fusion_registry
from lorakit.fusion.registry import FusionMethod
from lorakit.options import from_args, option
from lorakit.sampling import methods as sampling_methods
from lorakit.sampling.methods import Sampler, SamplerSettings, Term, method_plan


@dataclass(frozen=True)
class KnobSettings:
    knob: float = option(0.25, "dummy: how far to turn the knob", type=float)
    steps: int | None = option(None, "dummy: steps of the knob", type=int, show_default="7")


def _subparser(name: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def _option(parser, flag):
    return next(a for a in parser._actions if flag in a.option_strings)


def test_a_registered_fusion_method_is_offered_with_its_settings(monkeypatch):
    monkeypatch.setitem(fusion_registry.METHODS, "knob", FusionMethod("tests.nowhere:run", "turns a knob",
                                                                      KnobSettings))
    fuse = _subparser("fuse")
    assert "knob" in _option(fuse, "--method").choices
    help_text = " ".join(fuse.format_help().split())
    assert "turns a knob" in help_text
    assert "dummy: how far to turn the knob (default: 0.25)" in help_text
    # a flag two methods declare is one flag; its help names each method's default
    assert "ziplora 100" in help_text and "knob 7" in help_text
    args = fuse.parse_args(["--method", "knob", "--adapters", "a.safetensors", "--out", "o.safetensors"])
    assert from_args(KnobSettings, args) == KnobSettings()  # flags not given: the dataclass's defaults
    args = fuse.parse_args(["--method", "knob", "--adapters", "a.safetensors", "--out", "o.safetensors",
                            "--knob", "0.5", "--steps", "3"])
    assert from_args(KnobSettings, args) == KnobSettings(knob=0.5, steps=3)


def test_fusion_methods_get_their_settings_not_the_command_line():
    args = _subparser("fuse").parse_args(["--method", "ties", "--adapters", "a", "b", "--out", "o.safetensors",
                                          "--density", "0.3"])
    settings = from_args(fusion_registry.METHODS["ties"].settings, args)
    assert settings.density == 0.3 and settings.majority_sign == "total" and not hasattr(settings, "adapters")
    gradient = from_args(fusion_registry.METHODS["gradient"].settings, args)
    assert gradient.ridge == "auto" and gradient.capture_batch == 8


def _two_halves(settings, n, n_steps, order=None, n_rotation=None):
    return [[Term((i,), 0.5, 0.5) for i in range(n)]] * n_steps, {"halves": True}


def test_a_registered_sampler_is_offered_and_planned(monkeypatch):
    monkeypatch.setitem(sampling_methods.SAMPLERS, "halves", Sampler(_two_halves, "each adapter at half strength"))
    sample = _subparser("sample")
    assert "halves" in _option(sample, "--method").choices
    assert "each adapter at half strength" in sample.format_help()
    settings = SamplerSettings(method="halves", steps=3)
    settings.check()
    plan = method_plan(settings, 2, 3, None, None)
    assert plan.info == {"halves": True} and plan.terms[2] == [Term((0,), 0.5, 0.5), Term((1,), 0.5, 0.5)]
    with pytest.raises(ValueError, match="method must be one of"):
        SamplerSettings(method="unknown").check()


def test_the_registries_load_without_torch():
    """``lorakit --help`` builds every command's flags from the registries without importing torch."""
    import subprocess
    import sys

    code = "import sys; from lorakit.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
