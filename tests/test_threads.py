"""One place for CPU thread defaults (lorakit/threads.py): one torch thread and passive OpenMP waiting unless the
user sets OMP_NUM_THREADS / OMP_WAIT_POLICY, applied by the trainers' scripts and the CLI before torch loads."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = "import os, torch; print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'], os.environ['OMP_WAIT_POLICY'])"


def run(code: str, **env) -> tuple[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    proc = subprocess.run([sys.executable, "-c", code], env={**clean, "PYTHONPATH": str(ROOT), **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1], proc.stderr


@pytest.mark.parametrize("env, want", [
    ({}, "1 1 PASSIVE"),  # the defaults
    ({"OMP_NUM_THREADS": "2"}, "2 2 PASSIVE"),  # the user's count wins
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "1 1 ACTIVE"),  # and the user's wait policy
])
def test_defaults_and_user_settings(env, want):
    out, _ = run("from lorakit.threads import configure_threads; configure_threads(); " + REPORT, **env)
    assert out == want


def test_explicit_count_and_bad_values():
    if len(os.sched_getaffinity(0)) >= 2:  # (torch caps its default count at the cores it may use)
        out, _ = run("from lorakit.threads import configure_threads; configure_threads(2); " + REPORT,
                     OMP_NUM_THREADS="1")
        assert out == "2 2 PASSIVE"
    out, err = run("from lorakit.threads import configure_threads; configure_threads(); " + REPORT,
                   OMP_NUM_THREADS="many")
    assert out == "1 1 PASSIVE" and "OMP_NUM_THREADS='many' is not a positive integer" in err
    # torch already loaded: the count still applies
    out, _ = run("import torch; torch.set_num_threads(2); from lorakit.threads import configure_threads; "
                 "configure_threads(); " + REPORT)
    assert out.startswith("1 1 ")
    from lorakit.threads import configure_threads

    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        configure_threads(0)


@pytest.mark.parametrize("script", ["train_blockwise.py", "train_edlora.py", "train_lorarar.py"])
def test_trainer_scripts_apply_the_defaults_before_torch(script):
    # run the script's top level (not its main): torch must come up with lorakit's defaults
    out, _ = run(f"import runpy; runpy.run_path({str(ROOT / script)!r}, run_name='not_main'); " + REPORT)
    assert out == "1 1 PASSIVE"


def test_cli_applies_the_defaults():
    out, _ = run("from lorakit.cli import main; main(['toyworld', 'list']); " + REPORT)
    assert out == "1 1 PASSIVE"
