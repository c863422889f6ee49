"""What commands print: every --help option explained with its default; library chatter off unless --verbose;
--quiet hides progress bars."""

import argparse
import os
import warnings

import pytest

from lorakit import logs
from lorakit.cli import build_parser, main


def _subcommands():
    """Every subcommand parser by name, nested ones too (``toyworld render``)."""
    found = {}

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, command in action.choices.items():
                    found[f"{prefix}{name}"] = command
                    walk(command, f"{prefix}{name} ")

    walk(build_parser(), "")
    return found


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_option_has_help_and_its_default(name):
    command = _subcommands()[name]
    text = " ".join(command.format_help().split())
    formatter = command._get_formatter()
    for action in command._actions:
        if not action.option_strings or action.option_strings[0] == "-h":
            continue
        assert action.help, f"lorakit {name} {action.option_strings[0]} has no help text"
        shown = formatter._get_help_string(action).lower()
        if action.nargs != 0:  # flags are off unless given; every other option says its default or that it is required
            assert "default" in shown or "required" in shown, \
                f"lorakit {name} {action.option_strings[0]}: neither a default nor 'required' in {shown!r}"
        has_default = action.default is not None and action.default is not False and action.default not in ("", [])
        if action.nargs != 0 and has_default and action.default is not argparse.SUPPRESS:
            if "default" not in action.help.lower():
                value = action.default if not isinstance(action.default, list) else action.default[0]
                assert f"default: {value}" in text, f"lorakit {name} {action.option_strings[0]}: default {value!r} not shown"


def test_zero_defaults_are_shown():
    assert "(default: 0)" in " ".join(_subcommands()["sample"].format_help().split())


@pytest.fixture
def clean_verbosity(monkeypatch):
    monkeypatch.delenv(logs.ENV, raising=False)
    with warnings.catch_warnings():
        yield


def test_flags_are_taken_anywhere_and_last_wins(clean_verbosity):
    assert logs.take_flags(["sample", "--quiet", "--steps", "2"]) == ["sample", "--steps", "2"]
    assert logs.level() == "quiet" and not logs.show_progress()
    assert logs.take_flags(["--quiet", "fuse", "--verbose"]) == ["fuse"]
    assert logs.level() == "verbose"


def test_default_silences_uninformative_library_warnings(clean_verbosity):
    logs.configure(None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        logs.configure(None)  # filters are (re)installed on top
        warnings.warn("Already found a `peft_config` attribute in the model. Make sure to know what you are doing!")
        warnings.warn("something a user should see")
    assert [str(w.message) for w in seen] == ["something a user should see"]


def test_quiet_hides_progress_bars(clean_verbosity, capsys):
    logs.configure("quiet")
    for _ in logs.tqdm(range(3), desc="hidden-bar"):
        pass
    logs.configure("normal")
    for _ in logs.tqdm(range(3), desc="shown-bar"):
        pass
    err = capsys.readouterr().err
    assert "hidden-bar" not in err and "shown-bar" in err


def test_cli_restores_the_callers_verbosity(clean_verbosity, tmp_path):
    os.environ[logs.ENV] = "verbose"
    main(["--quiet", "inspect", str(tmp_path / "missing.safetensors")])
    assert os.environ[logs.ENV] == "verbose"
