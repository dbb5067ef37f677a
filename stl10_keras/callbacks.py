"""The training run's callbacks, and the keras internals they rely on.

- `Throughput`: training images per second, validation excluded.
- `EpochRandomState`: each epoch's dropout and augmentation randomness from
  (seed, epoch), so a resumed run draws what an uninterrupted one draws. It
  relies on keras' `SeedGenerator` keeping its state in a variable named
  `seed_generator_state` (checked under TensorFlow and JAX, keras 3.15), which
  `BackupAndRestore` does not save.
- `backup_and_restore`: keras' `BackupAndRestore` whose files are never
  half-written. It overrides keras' private `_save_model` and `_load_model`
  (keras 3.15: the weights in `latest.weights.h5`, the epoch in
  `training_metadata.json`, each copied to `*.bkp` first).
- `restore_backup`: the epoch an interrupted run resumes at, read through
  `BackupAndRestore` itself and keras' private `model._initial_epoch` (a
  mismatch with the data stream is reported by `EpochRandomState`).
"""

from __future__ import annotations

import json
import os
import time

from stl10_keras.errors import TrainingError
from stl10_keras.io_utils import atomic_copy, atomic_output, atomic_write_text


class Throughput:
    """Train-only images/second per epoch (validation time excluded)."""

    def __init__(self, batch_size: int):
        import keras

        outer = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                outer._t0 = time.perf_counter()
                outer._val = 0.0
                outer._steps = 0

            def on_train_batch_end(self, batch, logs=None):
                outer._steps += 1

            def on_test_begin(self, logs=None):
                outer._tv = time.perf_counter()

            def on_test_end(self, logs=None):
                outer._val += time.perf_counter() - outer._tv

            def on_epoch_end(self, epoch, logs=None):
                seconds = time.perf_counter() - outer._t0 - outer._val
                outer.epochs.append((outer._steps * batch_size, seconds))

        self.callback = Callback()
        self.epochs: list[tuple[int, float]] = []

    def images_per_sec(self) -> float | None:
        # The first epoch includes tracing and compilation; leave it out if we can.
        timed = self.epochs[1:] if len(self.epochs) > 1 else self.epochs
        seconds = sum(s for _, s in timed)
        return sum(n for n, _ in timed) / seconds if seconds > 0 else None


class EpochRandomState:
    """Draws each epoch's dropout and augmentation randomness from (seed, epoch).

    Dropout and `RandomAffine` draw from `keras.random.SeedGenerator`s whose
    state (a seed and a counter) is not among the weights that keras'
    `BackupAndRestore` saves, so a resumed run would start them over and
    repeat epoch 0's draws. At the start of epoch `e` this sets each
    generator's counter to its initial counter `+ e * 2**20` (an epoch takes
    fewer steps than that), so every epoch's draws are the same whether or not
    the run was resumed. It also checks that keras starts at `first_epoch`,
    the epoch the training data stream starts at.
    """

    def __init__(self, model, first_epoch: int):
        import keras

        from stl10_keras.data import EPOCH_SEED_STRIDE

        outer = self
        # SeedGenerator states are variables named like this, outside `weights`.
        self._states = [v for v in model.variables
                        if v.name == "seed_generator_state"]
        self._initial = [keras.ops.convert_to_numpy(v).tolist() for v in self._states]
        self._next_epoch = first_epoch

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                import numpy as np

                if epoch != outer._next_epoch:
                    raise TrainingError(
                        f"keras started epoch {epoch + 1} where the training data "
                        f"holds epoch {outer._next_epoch + 1}; rerun with --overwrite."
                    )
                outer._next_epoch = epoch + 1
                for v, (seed, counter) in zip(outer._states, outer._initial):
                    # Kept below 2**31: TensorFlow folds seeds into int32.
                    counter = (counter + epoch * EPOCH_SEED_STRIDE) % (2**31 - 1)
                    v.assign(np.array([seed, counter], dtype=v.dtype))

        self.callback = Callback()


def backup_and_restore(backup_dir: str | os.PathLike):
    """keras' `BackupAndRestore` (double checkpoint, kept after `fit`), atomic.

    keras writes `latest.weights.h5` in place, so a run killed during that
    write (right after an epoch's history row) leaves a truncated HDF5 file;
    h5py then raises `RuntimeError`, which keras' fall-back to the previous
    checkpoint (it catches `OSError`) lets through, and the rerun fails. Here
    the weights and the epoch record are written beside their final names and
    renamed into place, weights first; a file that still cannot be read (a
    full disk, say) counts as corrupt, so the previous checkpoint is used.
    Kept when `fit` returns (keras deletes it in `on_train_end` by default):
    it is the last epoch's state until the final weights are on disk.
    """
    import keras

    class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
        def _save_model(self):
            os.makedirs(self.backup_dir, exist_ok=True)
            for path, previous in ((self._weights_path, self._prev_weights_path),
                                   (self._training_metadata_path,
                                    self._prev_training_metadata_path)):
                if self.double_checkpoint and os.path.exists(path):
                    atomic_copy(path, previous)
            # keras infers the format from the name: the temp file ends alike.
            with atomic_output(self._weights_path, suffix=".weights.h5") as tmp:
                self.model.save_weights(tmp, overwrite=True)
            atomic_write_text(self._training_metadata_path, json.dumps(
                {"epoch": self._current_epoch, "batch": self._last_batch_seen}))

        def _load_model(self):
            try:
                super()._load_model()
            except RuntimeError as e:  # h5py: a truncated or corrupt file
                raise OSError(f"unreadable backup ({e})") from e

    return AtomicBackupAndRestore(str(backup_dir), double_checkpoint=True,
                                  delete_checkpoint=False)


def restore_backup(backup, training_model) -> int:
    """Restore an interrupted run's backup now; the epoch to resume at (0: none).

    `fit` restores it again (the same files), but the training data stream
    must start at that epoch before `fit` is called.
    """
    backup.set_model(training_model)
    backup.on_train_begin()
    return int(getattr(training_model, "_initial_epoch", None) or 0)


class LastEpochWeights:
    """Keeps a copy of `model`'s weights at the end of its last epoch.

    Read before `fit` returns, when keras (with `use_ema`) copies the moving
    average into the model: the raw weights the average is compared with.
    `weights` stays None when the last epoch is not trained in this `fit`.
    """

    def __init__(self, model, epochs: int):
        import keras

        self.weights = None
        outer = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch == epochs - 1:
                    outer.weights = model.get_weights()

        self.callback = Callback()
