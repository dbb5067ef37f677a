"""Every command answers a bad flag alike: one sentence and "see --help", exit 2.

Each runs as a user runs it (`python -m MODULE`, a fresh process), so what a
command imports or prints before parsing its flags is seen too.
"""

import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env

#: The modules of the commands, run as `python -m MODULE`.
COMMANDS = [
    "stl10_keras.train",
    "stl10_keras.ablation",
    "pipelines.run",
    "stl10_keras.serve",
    "stl10_keras.predict",
    "stl10_keras.export",
    "stl10_keras.embed",
    "stl10_keras.gradcheck",
]


@pytest.mark.parametrize("module", COMMANDS)
def test_an_unknown_flag_is_one_sentence_and_exit_code_2(module):
    proc = subprocess.run(
        [sys.executable, "-m", module, "--no-such-flag"], cwd=ROOT,
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 3, proc.stderr
    # (A command with a required flag may name that one first, as argparse does.)
    assert "see --help" in lines[-1] and ": error: " in lines[-1]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("module", ["stl10_keras.train", "stl10_keras.ablation",
                                    "pipelines.run"])
def test_a_bad_config_value_is_one_sentence_and_exit_code_2(module):
    # A value argparse takes (an int) that the config refuses (at least 1).
    proc = subprocess.run(
        [sys.executable, "-m", module, "--dataset", "digits", "--epochs", "0"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["error: --epochs must be at least 1."]
