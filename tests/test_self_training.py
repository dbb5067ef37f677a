"""Self-training: the pseudo-label selection against hand-computed cases, and a
run from the command line (teacher inside the run, rounds, a given teacher)."""
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ROOT, subprocess_env
from stl10_keras.methods.self_training import (gather_unlabeled, select_by_threshold,
                                               select_per_class)


def test_per_class_selection_keeps_the_most_confident_of_each_class():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2],   # class 0: 0.9 0.8 0.6
                      [0.3, 0.7], [0.05, 0.95], [0.45, 0.55]])  # class 1
    # keep 4/6 of 6 images -> 2 per class: the two most confident of each.
    np.testing.assert_array_equal(select_per_class(probs, 4 / 6), [0, 2, 3, 4])
    # 2 per class (keep 1.0 of 4 images, 2 classes): class 0 gives its best
    # 2 of 3, class 1 the one it has (balance, not every image).
    lopsided = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])
    np.testing.assert_array_equal(select_per_class(lopsided, 1.0), [0, 1, 3])
    np.testing.assert_array_equal(select_per_class(lopsided, 0.5), [0, 3])


def test_threshold_selection_keeps_what_reaches_it():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    np.testing.assert_array_equal(select_by_threshold(probs, 0.7), [0, 2])
    np.testing.assert_array_equal(select_by_threshold(probs, 0.95), [])


def test_gather_reads_the_kept_images_in_one_pass():
    images = np.arange(23, dtype=np.uint8)[:, None, None, None] * np.ones(
        (1, 2, 2, 1), np.uint8)

    def batches(size):
        for i in range(0, 23, size):
            yield images[i:i + size]

    splits = SimpleNamespace(unlabeled_batches=batches, image_shape=(2, 2, 1))
    kept = np.array([0, 4, 5, 21, 22])
    got = gather_unlabeled(splits, kept, batch_size=5)
    np.testing.assert_array_equal(got[:, 0, 0, 0], kept)
    assert gather_unlabeled(splits, np.array([], np.int64)).shape == (0, 2, 2, 1)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "stl10_keras.train", *args],
                          cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=900)


TINY = ["--dataset", "digits", "--preset", "smoke", "--variant", "self_training",
        "--batch-size", "40", "--widths", "4,8", "--fc-units", "16", "--epochs", "2",
        "--verbose", "0", "--no-export"]


@pytest.mark.e2e
def test_a_run_trains_its_teacher_keeps_its_pseudo_labels_and_reuses_a_teacher(
        tmp_path):
    from stl10_keras.data import load_splits

    run = tmp_path / "run"
    proc = _cli(*TINY, "--rounds", "2", "--pseudo-keep", "0.5", "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "teacher" / "model.keras").exists()
    assert (run / "round_1" / "model.keras").exists()  # round 1's student
    summary = json.loads((run / "pseudo_labels.json").read_text())
    stored = np.load(run / "pseudo_labels.npz")
    splits = load_splits("digits", seed=0)
    # The record's accuracy is the stored labels' agreement with the truth.
    truth = splits.unlabeled_labels[stored["indices"]]
    assert summary["accuracy"] == pytest.approx(np.mean(truth == stored["labels"]))
    assert summary["kept"] == len(stored["indices"]) <= splits.num_unlabeled // 2 + 10
    assert summary["teacher"].endswith("round_1/model.keras")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == summary
    # The student trained on labels + pseudo-labels: more steps per epoch.
    assert len(splits.y_train) + summary["kept"] > len(splits.y_train)
    # A finished run's teacher serves another run: no teacher trained there.
    # With --student-init teacher the student starts from its weights.
    other = tmp_path / "other"
    proc = _cli(*TINY, "--teacher", str(run), "--student-init", "teacher",
                "--verbose", "2", "--run-dir", str(other))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (other / "teacher").exists()
    assert f"starting from the weights of {run / 'model.keras'}" in proc.stdout
    assert json.loads((other / "pseudo_labels.json").read_text())["teacher"] == str(
        run / "model.keras")
