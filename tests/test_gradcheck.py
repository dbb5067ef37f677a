"""Tests of `python -m stl10_keras.gradcheck`: it passes on the real backward
passes, fails on deliberately wrong ones, and rejects bad flags."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from keras import ops

from stl10_keras import backprop, gradcheck, gradient_checks

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--batch", "3", "--channels", "2", "--height", "2", "--width", "2"]


def _without_dvar_term(dy, x, mean, var, gamma, epsilon, axes):
    """The lab's dE/dx with its dE/dsigma^2 * 2 (x_k - mu) / m term forgotten."""
    inv_std = ops.rsqrt(var + epsilon)
    dx_hat = dy * gamma
    m = int(np.prod([x.shape[a] for a in axes]))
    dmu = ops.sum(-dx_hat, axis=axes, keepdims=True) * inv_std
    good = backprop.batch_norm_backward(dy, x, mean, var, gamma, epsilon, axes)
    return good._replace(dx=dx_hat * inv_std + dmu / m)


def _without_sigmoid_derivative(dy, x1, x2):
    """dE/dx_i = dE/dy, as if the sigmoid module passed its gradient through."""
    good = backprop.dag_backward(dy, x1, x2)
    return good._replace(dx1=good.ds1, dx2=good.ds2)


def test_fails_when_dx_lacks_its_dvar_term(capsys):
    assert gradcheck.main(SMALL, bn_backward=_without_dvar_term) == 1
    failed = [line for line in capsys.readouterr().out.splitlines()
              if line.endswith("FAIL")]
    # dE/dx against both references, in both layouts; the other terms pass.
    assert len(failed) == 4
    dx_rows = ("BN dense dE/dx ", "BN conv dE/dx ")
    assert all(line.startswith(dx_rows) for line in failed)


def test_fails_when_the_dag_forgets_the_sigmoid_derivative():
    argv = SMALL[:4] + ["--height", "0", "--width", "0"]
    assert gradcheck.main(argv, dag_backward=_without_sigmoid_derivative) == 1


def test_inject_bug_offers_exactly_the_injectable_bugs():
    # The command lists the names before keras loads; the wrong passes need it.
    assert gradcheck.BUG_NAMES == tuple(sorted(gradient_checks.INJECTABLE_BUGS))


def test_injected_tie_bug_fails_only_at_ties(capsys):
    argv = SMALL[:4] + ["--height", "0", "--width", "0", "--inject-bug", "ties-to-x1"]
    assert gradcheck.main(argv) == 1
    failed = [line for line in capsys.readouterr().out.splitlines()
              if line.endswith("FAIL")]
    assert failed and all(line.startswith("DAG tie") for line in failed)


def test_cli_exit_codes():
    """`python -m stl10_keras.gradcheck`: 0 on the real code, 1 with a bug."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "stl10_keras.gradcheck", *SMALL]
    # Both start at once: most of each run is importing TensorFlow.
    runs = [
        subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for c in (cmd, cmd + ["--inject-bug", "drop-dvar-term"])
    ]
    (ok_out, ok_err), (bug_out, _) = (r.communicate(timeout=300) for r in runs)
    assert runs[0].returncode == 0, ok_out + ok_err
    for quantity in ("DAG tie x1==x2 dE/dx1", "BN conv dE/dsigma^2",
                     "BN dense dE/dmu 2nd term", "float16 in:", "batch of 1"):
        assert quantity in ok_out
    assert "FAIL" not in ok_out and "checks passed" in ok_out
    assert runs[1].returncode == 1, bug_out
    assert "injected bug: drop-dvar-term" in bug_out
    assert "4 of" in bug_out and "FAILED" in bug_out


@pytest.mark.parametrize(
    "argv",
    [
        ["--batch", "1"],
        ["--batch", "two"],
        ["--seed", "-1"],
        ["--channels", "0"],
        ["--tolerance", "0"],
        ["--tolerance", "nan"],
        ["--height", "0"],
        ["--width", "-1"],
        ["--inject-bug", "no-such-bug"],
        ["--no-such-flag"],
    ],
)
def test_bad_flags_exit_2_with_one_clear_message(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gradcheck.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_compare_measures_errors_normwise():
    ref = np.array([2.0, -4.0, 1.0])
    row = gradient_checks.compare("q", "r", ref + [0.0, 0.004, 0.0], ref, tolerance=2e-3)
    assert row.max_abs_error == pytest.approx(0.004)
    assert row.max_rel_error == pytest.approx(0.001)  # 0.004 / max|ref|
    assert row.passed
    assert not gradient_checks.compare("q", "r", ref + 0.01, ref, 1e-3).passed
    assert not gradient_checks.compare("q", "r", [np.nan, 0, 0], ref, 1e-3).passed
    assert not gradient_checks.compare("q", "r", ref[:2], ref, 1e-3).passed
    # A zero reference is measured against the given scale.
    row = gradient_checks.compare("q", "r", [1e-9], [0.0], 1e-6, scale=10.0)
    assert row.max_rel_error == pytest.approx(1e-10) and row.passed


def test_central_differences_and_autodiff_of_a_known_function():
    rng = np.random.default_rng(0)
    x, dy = rng.normal(size=(3, 2)), rng.normal(size=(3, 2))
    loss = gradient_checks.weighted_sum(lambda v: v**3, dy)
    expected = 3 * x**2 * dy
    np.testing.assert_allclose(gradient_checks.central_differences(loss, [x], 0), expected,
                               rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(gradient_checks.autodiff(loss, [x])[0], expected, rtol=1e-12)


def test_masked_rows_fail_only_with_a_backward_that_ignores_the_mask(capsys):
    argv = SMALL + ["--inject-bug", "mask-ignored"]
    assert gradcheck.main(argv) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.endswith("FAIL")]
    # dE/dx and dE/dmu, against autodiff and central differences, for the
    # padded sequences and for the fully masked batch.
    for layout in ("BN masked (N,T,C) ", "BN fully masked "):
        for reference in ("autodiff", "central differences"):
            assert any(line.startswith(layout + "dE/dx ") and reference in line
                       for line in failed), out
    assert all(line.startswith(("BN masked", "BN fully masked")) for line in failed)


def test_masked_rows_pass_with_the_library_backward(capsys):
    assert gradcheck.main(SMALL[:4] + ["--height", "0", "--width", "0"]) == 0
    out = capsys.readouterr().out
    assert "BN fully masked dE/dx " in out and "fully masked layer: y" in out
    assert "BN masked (N,T,C) dE/dsigma^2" in out


# `python -m stl10_keras.gradcheck ...` with any import of keras or a backend
# an ImportError: the flags must be answered before those load.
NO_KERAS = """
import runpy, sys
HEAVY = {"keras", "tensorflow", "jax", "torch"}
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HEAVY:
            raise ImportError(f"{name} imported before the flags were checked")
sys.meta_path.insert(0, Refuse())
sys.argv = ["gradcheck", *sys.argv[1:]]
runpy.run_module("stl10_keras.gradcheck", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("argv, code, needle", [
    (["--batch", "1"], 2, "error: argument --batch: must be at least 2"),
    (["--height", "0"], 2, "error: --height and --width must both be positive"),
    (["--inject-bug", "nope"], 2, "error: argument --inject-bug: invalid choice"),
    (["--help"], 0, "--inject-bug {drop-dvar-term,mask-ignored,ties-to-x1}"),
])
def test_flags_are_answered_before_keras_loads(argv, code, needle):
    proc = subprocess.run([sys.executable, "-c", NO_KERAS, *argv], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert needle in (proc.stderr if code else proc.stdout)
