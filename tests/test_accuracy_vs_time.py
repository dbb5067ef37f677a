"""benchmarks/accuracy_vs_time.py on planted runs: the teacher's time comes
first, epochs are spread over each run's wall time, the figure is written."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env

sys.path.insert(0, str(ROOT / "benchmarks"))

import accuracy_vs_time  # noqa: E402


def plant(run, wall, vals, variant="baseline", test=0.5):
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.json").write_text(json.dumps({
        "history": [{"epoch": i + 1, "val_accuracy": v} for i, v in enumerate(vals)],
        "wall_seconds": wall, "variant": variant, "val_accuracy": vals[-1],
        "test_accuracy": test}))


def test_a_students_curve_starts_after_its_teacher(tmp_path):
    run = tmp_path / "st"
    plant(run / "teacher", 100.0, [0.5, 0.6])
    plant(run / "round_1", 50.0, [0.7])
    plant(run, 30.0, [0.8, 0.9, 0.95], variant="self_training")
    seconds, accuracy, metrics = accuracy_vs_time.curve(run)
    assert seconds == pytest.approx([50, 100, 150, 160, 170, 180])
    assert accuracy == pytest.approx([50, 60, 70, 80, 90, 95])
    assert metrics["variant"] == "self_training"


def test_the_command_prints_a_row_per_run_and_writes_the_figure(tmp_path):
    plant(tmp_path / "a", 10.0, [0.4, 0.8], test=0.75)
    out = tmp_path / "f.png"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" /
                                               "accuracy_vs_time.py"),
                           str(tmp_path / "a"), "--out", str(out)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"| {tmp_path.name}/a (baseline) | 80.00 | 75.00 | 10 |" in proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" /
                                              "accuracy_vs_time.py"),
                          str(tmp_path / "none"), "--out", str(out)], cwd=ROOT,
                         env=subprocess_env(), capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "holds no metrics.json" in bad.stderr
