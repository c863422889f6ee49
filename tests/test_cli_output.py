"""What commands print: every --help option explained with its default; library chatter off unless --verbose;
--quiet hides progress bars and notes; lorakit's warnings are one line each."""

import argparse
import os
import subprocess
import sys
import warnings
from pathlib import Path

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



def test_every_help_answers_without_loading_the_libraries():
    """``--help`` of every command, nested ones and every recipe of ``lorakit train`` included, in one process:
    none loads torch, diffusers or transformers (their imports take seconds; the help texts need none of them), so
    ``--help`` answers in well under 2 s (about 0.5 s of CPU; the time itself is not asserted here)."""
    from lorakit.training.entry import TRAINERS

    commands = [[], *[name.split() for name in _subcommands()], *[["train", name] for name in TRAINERS]]
    code = ("import sys, io, contextlib\nfrom lorakit.cli import main\n"
            f"for argv in {commands!r}:\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out):\n"
            "        try:\n            main([*argv, '--help'])\n"
            "        except SystemExit as stop:\n            assert stop.code == 0, argv\n"
            "    assert out.getvalue().startswith('usage: lorakit'), argv\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout

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


def test_verbose_undoes_the_library_settings_lorakit_made(clean_verbosity, monkeypatch):
    monkeypatch.delenv("DIFFUSERS_VERBOSITY", raising=False)
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")  # the user's own
    logs.configure("normal")
    assert os.environ["DIFFUSERS_VERBOSITY"] == "error" and os.environ["TRANSFORMERS_VERBOSITY"] == "info"
    logs.configure("verbose")
    assert "DIFFUSERS_VERBOSITY" not in os.environ and os.environ["TRANSFORMERS_VERBOSITY"] == "info"


def test_cli_restores_the_callers_verbosity(clean_verbosity, tmp_path):
    os.environ[logs.ENV] = "verbose"
    main(["--quiet", "inspect", str(tmp_path / "missing.safetensors")])
    assert os.environ[logs.ENV] == "verbose"


def test_notes_follow_the_verbosity_and_the_main_process(clean_verbosity, monkeypatch, capsys):
    logs.configure("normal")
    logs.note("a note")
    logs.configure("quiet")
    logs.note("a hidden note")
    logs.configure("normal")
    monkeypatch.setenv("RANK", "1")  # a second process under accelerate launch says nothing
    logs.note("from process 1")
    assert capsys.readouterr().out == "a note\n"


def test_lorakit_warnings_are_one_line_also_under_quiet():
    code = ("import warnings; from lorakit import logs; logs.configure('quiet'); "
            "logs.warn('checkpoint was made with global batch 8, now 4'); warnings.warn('a library notice')")
    env = {k: v for k, v in os.environ.items() if k != logs.ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    lines = out.stderr.splitlines()
    assert lines[0] == "lorakit: warning: checkpoint was made with global batch 8, now 4", out.stderr
    assert "UserWarning: a library notice" in lines[1]  # anything else as Python shows it


def test_lorakit_warnings_are_caught_as_warnings(clean_verbosity):
    logs.configure("normal")
    with pytest.warns(UserWarning, match="global batch"):
        logs.warn("checkpoint was made with global batch 8, now 4")


REPO = Path(__file__).resolve().parents[1]
# What the libraries print while lorakit loads a pipeline or trains: diffusers' loading bars, the notice that
# torchvision is missing, diffusers' float32 casting notice. None of it is anything a lorakit user acts on.
LIBRARY_CHATTER = ("Loading pipeline components", "torchvision", "should be kept in float32", "Loading weights")


def _run(*argv):
    env = {k: v for k, v in os.environ.items() if k != logs.ENV and k not in logs._LIBRARY_ENV}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_inspect_with_a_base_prints_library_chatter_only_when_verbose(tmp_path):
    """``lorakit inspect FILE --base`` loads the toy base through diffusers (three runs, ~12 s of CPU each)."""
    from lorakit.adapters.io import save_adapter
    from lorakit.adapters.synthetic import random_adapter
    from lorakit.models import load_base

    lora = save_adapter(random_adapter(load_base(str(REPO / "data" / "toy-base"))), tmp_path / "one.safetensors")
    command = ["-m", "lorakit.cli", "inspect", str(lora), "--base", "data/toy-base"]
    default, verbose, quiet = _run(*command), _run(*command, "--verbose"), _run("-m", "lorakit.cli", "--quiet",
                                                                                   *command[2:])
    assert not [c for c in LIBRARY_CHATTER if c in default.stderr], default.stderr[-2000:]
    assert "Loading pipeline components" in verbose.stderr
    assert "fits base:" in default.stdout and quiet.stdout == default.stdout and quiet.stderr == ""


@pytest.mark.slow
def test_training_script_follows_quiet_and_verbose(tmp_path):
    """``train_blockwise.py`` (one step on the tiny SD1 model): by default its notes and summary, no library
    chatter; ``--verbose`` adds the libraries' notices; ``--quiet`` keeps only the summary (~15 s of CPU each)."""
    common = ["train_blockwise.py", "--config", "train_configs/toy_character.yaml", "base_model=tiny:sd1",
              "max_steps=1", "logging=none", "checkpoint_at_end=false", "sample_every=0", "save_every=0",
              "data.cache_latents=false"]
    default = _run(*common, f"output_dir={tmp_path / 'default'}")
    verbose = _run(*common, f"output_dir={tmp_path / 'verbose'}", "--verbose")
    quiet = _run("train_blockwise.py", "--quiet", *common[1:], f"output_dir={tmp_path / 'quiet'}")
    assert not [c for c in LIBRARY_CHATTER if c in default.stderr], default.stderr[-2000:]
    assert "lorakit: block-wise" in default.stdout and "lorakit: trained 1 steps" in default.stdout
    assert "train:" in default.stderr  # the progress bar
    assert "should be kept in float32" in verbose.stderr
    assert "lorakit: block-wise" not in quiet.stdout and "lorakit: trained 1 steps" in quiet.stdout
    assert quiet.stderr == "", quiet.stderr[-2000:]



def test_loading_several_adapters_hides_peft_notice_unless_verbose(clean_verbosity, tmp_path):
    """peft warns "Already found a `peft_config`" for every adapter after the first, however they are loaded;
    lorakit's loaders drop it for Python callers too (not only on the command line), except under --verbose."""
    from lorakit.adapters.io import apply_adapter, save_adapter
    from lorakit.models import tiny_pipeline
    from lorakit.sampling.loading import load_adapters
    from lorakit.testing import random_adapter

    pipe, other = tiny_pipeline("sd1", seed=0), tiny_pipeline("sd1", seed=0)
    files = [save_adapter(random_adapter(pipe, seed=k), tmp_path / f"a{k}.safetensors") for k in range(3)]
    adapters = [random_adapter(other, seed=k) for k in range(3)]

    def peft_notices(verbosity, first, last):
        os.environ[logs.ENV] = verbosity
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            load_adapters(pipe, files[first:last])  # diffusers' load_lora_weights (sampling, the demo)
            for k in range(first, last):  # lorakit's own peft injection (retention, LoHa / LoKr files)
                apply_adapter(other, adapters[k], f"b{k}")
            warnings.warn("something a user should see")
        assert "something a user should see" in [str(w.message) for w in seen]
        return len([w for w in seen if "Already found a `peft_config`" in str(w.message)])

    assert peft_notices("normal", 0, 2) == 0  # the second adapter of each pipeline would warn
    assert peft_notices("verbose", 2, 3) == 2
    assert len(pipe.get_list_adapters()["unet"]) == 3 and set(other.unet.peft_config) == {"b0", "b1", "b2"}


@pytest.mark.slow
def test_sampling_with_two_adapters_prints_library_notices_only_when_verbose(tmp_path):
    """``lorakit sample`` with two LoRAs on the tiny SD1 model, one step (two runs, ~12 s of CPU each): peft's
    second-adapter notice and the loading chatter only under ``--verbose``."""
    from lorakit.adapters.io import save_adapter
    from lorakit.models import tiny_pipeline
    from lorakit.testing import random_adapter

    pipe = tiny_pipeline("sd1", seed=0)
    files = [str(save_adapter(random_adapter(pipe, seed=k), tmp_path / f"a{k}.safetensors")) for k in range(2)]
    command = ["-m", "lorakit.cli", "sample", "--base", "tiny:sd1", "--adapters", *files, "--prompt", "a cat",
               "--steps", "1"]
    default = _run(*command, "--out", str(tmp_path / "default"))
    verbose = _run(*command, "--out", str(tmp_path / "verbose"), "--verbose")
    assert not [c for c in (*LIBRARY_CHATTER, "peft_config") if c in default.stderr], default.stderr[-2000:]
    assert "Already found a `peft_config`" in verbose.stderr and "torchvision" in verbose.stderr
