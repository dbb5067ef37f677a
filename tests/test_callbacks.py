"""The atomic BackupAndRestore: a backup killed mid-write never stops a resume."""

import json

import numpy as np
import pytest

from stl10_keras import callbacks as cb


def _model():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def _fit(model, backup, epochs, initial_epoch=0):
    x = np.arange(24, dtype="float32").reshape(8, 3) / 24
    y = np.ones((8, 2), "float32")
    model.fit(x, y, epochs=epochs, initial_epoch=initial_epoch, callbacks=[backup],
              verbose=0, shuffle=False)


def test_a_truncated_backup_falls_back_to_the_previous_epoch(tmp_path):
    model = _model()
    backup = cb.backup_and_restore(tmp_path)
    _fit(model, backup, epochs=1)
    after_one = [w.copy() for w in model.get_weights()]
    _fit(model, backup, epochs=2, initial_epoch=1)
    # What keras' in-place write can leave when the process is killed during
    # it: the file at its size, its tail never written. h5py raises
    # RuntimeError on it, which keras' own fall-back (OSError) lets through.
    latest = tmp_path / "latest.weights.h5"
    data = latest.read_bytes()
    latest.write_bytes(data[:2048] + bytes(len(data) - 2048))
    fresh = _model()
    epoch = cb.restore_backup(cb.backup_and_restore(tmp_path), fresh)
    assert epoch == 1
    for got, want in zip(fresh.get_weights(), after_one):
        np.testing.assert_array_equal(got, want)


def test_a_write_that_dies_leaves_the_last_complete_backup(tmp_path, monkeypatch):
    model = _model()
    backup = cb.backup_and_restore(tmp_path)
    _fit(model, backup, epochs=1)
    complete = (tmp_path / "latest.weights.h5").read_bytes()
    record = json.loads((tmp_path / "training_metadata.json").read_text())

    def dies_half_way(filepath, overwrite=True):
        with open(filepath, "wb") as f:
            f.write(complete[:1000])
        raise KeyboardInterrupt  # stands for the SIGKILL

    monkeypatch.setattr(model, "save_weights", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        _fit(model, backup, epochs=2, initial_epoch=1)
    assert (tmp_path / "latest.weights.h5").read_bytes() == complete
    assert json.loads((tmp_path / "training_metadata.json").read_text()) == record
