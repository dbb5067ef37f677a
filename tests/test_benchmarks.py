"""The benchmark scripts without a test file of their own: bad flags.

A bad flag must be a usage error (exit code 2, argparse's one `error:` line)
before any work, not a traceback after minutes of timing or a table of zeros;
and before keras, TensorFlow or scikit-learn load (seconds), not after.
"""

import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env

BAD_FLAGS = [
    ("train_step.py", ["--jit", "fast"], "--jit takes"),
    ("train_step.py", ["--widths", "64,x"], "--widths takes integers"),
    ("train_step.py", ["--batch-size", "0"], "--batch-size"),
    ("augment.py", ["--batch-sizes", "0"], "--batch-sizes must be >= 1"),
    ("kmeans.py", ["--images", "0"], "--images"),
    ("fashion_epoch.py", ["--jit", "fast"], "--jit takes"),
    ("fashion_epoch.py", ["--steps-per-execution", "1,x"], "take integers"),
    ("fashion_epoch.py", ["--epochs", "1"], "--epochs >= 2"),
]

# Runs a script as `python SCRIPT ...` would, but with any import of the heavy
# libraries an ImportError (a traceback and exit code 1, not argparse's 2).
NO_HEAVY_IMPORTS = """
import os, runpy, sys
HEAVY = {"keras", "tensorflow", "sklearn", "jax", "torch"}
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HEAVY:
            raise ImportError(f"{name} imported before the flags were checked")
sys.meta_path.insert(0, Refuse())
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def check_usage_error(proc, script, needle):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error: ") and needle in last


@pytest.mark.parametrize("script, flags, needle", BAD_FLAGS)
def test_a_bad_benchmark_flag_is_a_usage_error(script, flags, needle):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *flags], cwd=ROOT,
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    check_usage_error(proc, script, needle)


@pytest.mark.parametrize("script, flags, needle", BAD_FLAGS)
def test_a_bad_benchmark_flag_is_refused_before_keras_loads(script, flags, needle):
    proc = subprocess.run(
        [sys.executable, "-c", NO_HEAVY_IMPORTS,
         str(ROOT / "benchmarks" / script), *flags], cwd=ROOT,
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    check_usage_error(proc, script, needle)
