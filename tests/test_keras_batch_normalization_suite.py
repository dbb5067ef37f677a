"""keras' own BatchNormalization tests, run against ManualBatchNorm.

The installed keras wheel ships `keras/src/layers/normalization/
batch_normalization_test.py`. It runs here unchanged, in a pytest of its own,
with `BatchNormalization` in it meaning ManualBatchNorm
(tests/manual_bn_keras_plugin.py), under TensorFlow and under JAX. Left out:
the batch renormalization tests and `test_serialization` (it builds a renorm
layer), because ManualBatchNorm refuses `renorm=True`. Nothing else is
skipped: keras' tests skip nothing on these two backends.
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from conftest import FAST_XLA, ROOT, subprocess_env

KERAS_TESTS = (Path(keras.__file__).parent / "src" / "layers" / "normalization"
               / "batch_normalization_test.py")
LEFT_OUT = "not renorm and not test_serialization"
# keras 3.15.1 (requirements.txt): 33 tests, of which 6 are left out.
EXPECTED_PASSED = 27


def _pytest(backend: str) -> subprocess.Popen:
    env = subprocess_env(
        KERAS_BACKEND=backend,
        TF_CPP_MIN_LOG_LEVEL="3",
        XLA_FLAGS=FAST_XLA,
        PYTHONPATH=f"{ROOT / 'tests'}:{ROOT}",
    )
    cmd = [sys.executable, "-m", "pytest", str(KERAS_TESTS), "-k", LEFT_OUT,
           "-p", "manual_bn_keras_plugin", "-p", "no:cacheprovider",
           # This repository's settings, whichever pytest.ini sits above the
           # venv; without its addopts (one process, no xdist).
           "-c", str(ROOT / "pytest.ini"), "-o", "addopts=",
           "-q", "-rfEs", "-W", "ignore::UserWarning"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _check(proc: subprocess.Popen, backend: str) -> None:
    out, _ = proc.communicate(timeout=600)
    tail = out[-6000:]
    assert proc.returncode == 0, tail
    summary = re.search(r"(\d+) passed", out)
    assert summary and int(summary.group(1)) == EXPECTED_PASSED, tail
    assert not re.search(r"\d+ (failed|skipped|errors?)\b", out), tail
    # The swap took effect: the tests built ManualBatchNorm layers.
    built = re.search(r"ManualBatchNorm layers constructed: (\d+) \(backend (\w+)\)",
                      out)
    assert built and int(built.group(1)) > EXPECTED_PASSED, tail
    assert built.group(2) == backend


JAX_INSTALLED = importlib.util.find_spec("jax") is not None
BACKENDS = ["tensorflow", pytest.param("jax", marks=pytest.mark.skipif(
    not JAX_INSTALLED,
    reason="jax is not installed (an optional dev dependency: requirements-dev.txt)",
))]


@pytest.fixture(scope="module")
def runs():
    # Both backends at once: most of each run is importing the backend.
    backends = ["tensorflow"] + (["jax"] if JAX_INSTALLED else [])
    procs = {backend: _pytest(backend) for backend in backends}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("backend", BACKENDS)
def test_keras_batch_normalization_tests_pass(runs, backend):
    _check(runs[backend], backend)
