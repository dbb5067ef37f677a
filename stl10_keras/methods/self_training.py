"""`self_training`: a teacher labels the unlabeled images, a student learns from both.

In the style of Noisy Student (Xie et al., 2020): a teacher, a finished run
(`--teacher RUN`) or trained first inside this run (`RUN/teacher/`, an
ordinary resumable run of the labeled images alone), predicts every
unlabeled image (averaged with its mirror image when the run flips). The
most confident predictions become hard pseudo-labels, the same number of
each class (`--pseudo-keep`, a share of the unlabeled images), or every one
above `--pseudo-threshold`. A student then trains on the labeled and the
pseudo-labeled images together, with noise: the run's augmentation and
dropout. With `--rounds N` the student of one round is the next round's
teacher (`RUN/round_1/`, ...); the last round is this run.

The pseudo-labels and their confidences are kept in `RUN/pseudo_labels.npz`
(stream indices, labels, confidences) with a summary in
`RUN/pseudo_labels.json` (how many of each class, their accuracy where the
true labels are known), so a resumed run trains on the same ones.

The student's training model is the supervised one (`none`); its epochs are
passes over the larger set, by default as many steps as the teacher's run.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from stl10_keras.errors import ConfigError
from stl10_keras.flags import option
from stl10_keras.methods.base import register
from stl10_keras.methods.supervised import Supervised

if TYPE_CHECKING:
    from stl10_keras.config import Config

PSEUDO_LABELS = "pseudo_labels.npz"
PSEUDO_SUMMARY = "pseudo_labels.json"
SELECTIONS = ("per-class", "threshold")
STUDENT_INITS = ("scratch", "teacher")


@dataclass
class SelfTrainingConfig:
    """Self-training's settings."""

    flag_group: ClassVar[str] = "self-training (--semi-supervised self_training)"

    teacher: str | None = option(
        None, "a finished run (its directory) whose model labels the unlabeled "
        "images (default: train one first on the labeled images, in RUN/teacher)",
        "--teacher")
    selection: str = option(
        "per-class", "per-class: the most confident share --pseudo-keep of the "
        "unlabeled images, the same number of each class; threshold: every "
        "prediction at --pseudo-threshold or more", "--pseudo-selection",
        choices=SELECTIONS)
    keep: float = option(
        0.8, "per-class selection: the share of the unlabeled images kept",
        "--pseudo-keep")
    threshold: float = option(
        0.9, "threshold selection: the least top probability kept",
        "--pseudo-threshold")
    rounds: int = option(
        1, "teacher -> student rounds; each student teaches the next", "--rounds")
    student_init: str = option(
        "teacher", "scratch: the student starts as any run does (random or k-means "
        "weights, or --init-from); teacher: from the last teacher's weights (same "
        "network only)", "--student-init", choices=STUDENT_INITS)
    student_epochs: int | None = option(
        None, "the student's passes over labeled + pseudo-labeled images (default: "
        "as many steps as the run's --epochs over the labeled images)",
        "--student-epochs")


@register
class SelfTraining(Supervised):
    """A teacher's confident pseudo-labels join the labels; a student trains."""

    name = "self_training"
    summary = ("a teacher's confident pseudo-labels join the labeled images; a "
               "student trains on both (Noisy Student style)")
    section = SelfTrainingConfig
    # Measured: a teacher with the lab's augmentation was 13 points below the
    # baseline on Fashion-MNIST (100 labels per class) and 6.7 on digits; the
    # student's noise is then dropout (docs/semi-supervised.md).
    base_variant = "baseline"
    uses_unlabeled = True
    averages_weights = False

    @classmethod
    def validate(cls, config: "Config") -> None:
        s = cls.options_of(config)
        if not 0.0 < s.keep <= 1.0:
            raise ConfigError("--pseudo-keep must be in (0, 1], e.g. 0.8.")
        if not 0.0 <= s.threshold <= 1.0:
            raise ConfigError("--pseudo-threshold must be in [0, 1], e.g. 0.9.")
        if s.rounds < 1:
            raise ConfigError("--rounds must be at least 1.")
        if s.student_epochs is not None and s.student_epochs < 1:
            raise ConfigError("--student-epochs must be at least 1.")
        if s.teacher is not None and not s.teacher.strip():
            raise ConfigError("--teacher needs a finished run's directory.")

    def epochs(self, splits) -> int:
        """The student's epochs over `splits` (labeled + pseudo-labeled)."""
        s, t = self.options, self.config.train
        if s.student_epochs is not None:
            return s.student_epochs
        labeled = len(splits.y_train) - self.kept
        return max(1, math.ceil(t.epochs * labeled / len(splits.y_train)))

    def initial_weights(self) -> str | None:
        if self.options.student_init == "teacher":
            return self.teacher
        return super().initial_weights()

    def prepare(self, splits, verbose: int = 1):
        from stl10_keras.io_utils import read_json

        splits = super().prepare(splits, verbose)
        path = Path(self.run_dir) / PSEUDO_LABELS
        if not path.exists():
            teacher = self._teacher(splits, verbose)
            _write_pseudo_labels(path, *self._pseudo_labels(teacher, splits),
                                 splits, str(teacher), verbose)
        with np.load(path) as stored:
            indices, labels = stored["indices"], stored["labels"]
        self.kept = len(indices)
        self.teacher = read_json(path.with_name(PSEUDO_SUMMARY))["teacher"]
        images = gather_unlabeled(splits, indices)
        return dataclasses.replace(
            splits, x_train=np.concatenate([splits.x_train, images]),
            y_train=np.concatenate([splits.y_train, labels.astype(np.int32)]))

    def record(self) -> dict[str, Any] | None:
        from stl10_keras.io_utils import read_json

        path = Path(self.run_dir) / PSEUDO_SUMMARY
        return read_json(path) if path.exists() else None

    # --- the teacher --------------------------------------------------------

    def _teacher(self, splits, verbose: int) -> Path:
        """The last teacher's `model.keras`, training the missing ones (each a
        resumable run inside this one)."""
        from stl10_keras.train import init_from_path

        s = self.options
        if s.teacher is not None:
            teacher = init_from_path(s.teacher)
        else:
            teacher = self._train_nested(_teacher_config(self.config), "teacher",
                                         splits, verbose)
        for r in range(1, s.rounds):
            config = copy.deepcopy(self.config)
            round_options = config.methods[self.name]
            round_options.teacher, round_options.rounds = str(teacher.parent), 1
            teacher = self._train_nested(config, f"round_{r}", splits, verbose)
        return teacher

    def _train_nested(self, config: "Config", name: str, splits,
                      verbose: int) -> Path:
        from stl10_keras.train import train

        run = Path(self.run_dir) / name
        if verbose:
            print(f"self-training: {name} in {run}")
        metrics = train(config, run, export_dir=None, verbose=verbose,
                        splits=splits, device_line=False)
        if verbose:
            print(f"self-training: {name} validation accuracy "
                  f"{metrics['val_accuracy']:.4f}")
        return run / "model.keras"

    def _pseudo_labels(self, teacher: Path, splits):
        """`(indices, labels, confidences)` of the kept unlabeled images."""
        from stl10_keras.model import load_model

        model = load_model(teacher)
        probs = predict_unlabeled(model, splits, flip=self.config.augment.flip)
        s = self.options
        if s.selection == "threshold":
            indices = select_by_threshold(probs, s.threshold)
        else:
            indices = select_per_class(probs, s.keep)
        return (indices, probs[indices].argmax(1).astype(np.int32),
                probs[indices].max(1).astype(np.float32))


def _teacher_config(config: "Config") -> "Config":
    """The run's config for its teacher: the labeled images alone (`none`)."""
    teacher = copy.deepcopy(config)
    teacher.semi_supervised.method = "none"
    teacher.variant = SelfTraining.base_variant
    return teacher


# --- pseudo-labels: numpy, testable on planted probabilities --------------------

def predict_unlabeled(model, splits, flip: bool, batch_size: int = 512) -> np.ndarray:
    """The model's class probabilities of every unlabeled image, in stream order;
    with `flip`, averaged with those of the mirror image."""
    import keras

    out = []
    for images in splits.unlabeled_batches(batch_size):
        x = np.asarray(images, np.float32)
        p = keras.ops.convert_to_numpy(keras.ops.softmax(model(x, training=False)))
        if flip:
            mirrored = model(x[:, :, ::-1], training=False)
            p = (p + keras.ops.convert_to_numpy(keras.ops.softmax(mirrored))) / 2
        out.append(p)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def select_per_class(probs: np.ndarray, keep: float) -> np.ndarray:
    """Indices of the most confident `keep` share, balanced across classes.

    Each class gets `round(keep * N / K)` images, those predicted as that class
    with the highest top probability (fewer when fewer are predicted as it).

    Returns:
        Sorted indices into `probs`.
    """
    n, k = probs.shape
    per_class = int(round(keep * n / k))
    predicted, confidence = probs.argmax(1), probs.max(1)
    chosen = []
    for c in range(k):
        members = np.flatnonzero(predicted == c)
        order = members[np.argsort(-confidence[members], kind="stable")]
        chosen.append(order[:per_class])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def select_by_threshold(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Sorted indices of the predictions whose top probability is >= `threshold`."""
    return np.flatnonzero(probs.max(1) >= threshold).astype(np.int64)


def gather_unlabeled(splits, indices: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """The unlabeled images at sorted stream `indices` (one pass, kept ones only)."""
    kept, start = [], 0
    for images in splits.unlabeled_batches(batch_size):
        n = len(images)
        inside = indices[(indices >= start) & (indices < start + n)] - start
        if len(inside):
            kept.append(np.asarray(images)[inside])
        start += n
    if not kept:
        return np.zeros((0, *splits.image_shape), np.uint8)
    return np.concatenate(kept)


def _write_pseudo_labels(path: Path, indices, labels, confidences, splits,
                         teacher: str, verbose: int) -> None:
    """The pseudo-labels (npz) and their summary (json), each written atomically."""
    from stl10_keras.io_utils import atomic_output, atomic_write_json

    summary = {"teacher": teacher, "kept": int(len(indices)),
               "unlabeled": int(splits.num_unlabeled or 0),
               "per_class": np.bincount(labels, minlength=len(splits.class_names)
                                        ).tolist(),
               "mean_confidence": float(confidences.mean()) if len(indices) else None,
               "accuracy": None}
    truth = getattr(splits, "unlabeled_labels", None)
    if truth is not None and len(indices):
        summary["accuracy"] = float(np.mean(np.asarray(truth)[indices] == labels))
    with atomic_output(path, suffix=".npz") as tmp:
        np.savez(tmp, indices=indices, labels=labels, confidences=confidences)
    atomic_write_json(path.with_name(PSEUDO_SUMMARY), summary)
    if verbose:
        known = (f", {100 * summary['accuracy']:.1f} % of them right"
                 if summary["accuracy"] is not None else "")
        print(f"self-training: kept {summary['kept']} pseudo-labels of "
              f"{summary['unlabeled']} unlabeled images{known}")
