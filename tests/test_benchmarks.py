"""The benchmark scripts without a test file of their own: bad flags.

A bad flag must be a usage error (exit code 2, argparse's one `error:` line)
before any work, not a traceback after minutes of timing or a table of zeros.
"""

import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env


@pytest.mark.parametrize("script, flags, needle", [
    ("train_step.py", ["--jit", "fast"], "--jit takes"),
    ("train_step.py", ["--widths", "64,x"], "--widths takes integers"),
    ("train_step.py", ["--batch-size", "0"], "--batch-size"),
    ("augment.py", ["--batch-sizes", "0"], "--batch-sizes must be >= 1"),
    ("kmeans.py", ["--images", "0"], "--images"),
])
def test_a_bad_benchmark_flag_is_a_usage_error(script, flags, needle):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *flags], cwd=ROOT,
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error: ") and needle in last
