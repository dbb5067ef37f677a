"""pytest plugin: keras' own BatchNormalization tests, run against ManualBatchNorm.

Loaded with `-p manual_bn_keras_plugin` (tests/ on PYTHONPATH) by
tests/test_keras_batch_normalization_suite.py. Each collected test module's
`layers` (keras.src.layers, which the tests take `BatchNormalization` from)
is replaced by a view of it in which `BatchNormalization` is ManualBatchNorm;
every other layer stays keras' own, and nothing else in keras is patched.
"""

import types

import pytest

import keras
import keras.src.layers as keras_layers

from stl10_keras.layers import ManualBatchNorm

constructed = 0
_original_init = ManualBatchNorm.__init__


def _counting_init(self, *args, **kwargs):
    global constructed
    constructed += 1
    _original_init(self, *args, **kwargs)


class _LayersWithManualBatchNorm(types.ModuleType):
    BatchNormalization = ManualBatchNorm

    def __getattr__(self, name):
        return getattr(keras_layers, name)


def pytest_configure(config):
    ManualBatchNorm.__init__ = _counting_init
    # keras' repository conftest.py registers this marker; the wheel has none.
    config.addinivalue_line(
        "markers", "requires_trainable_backend: needs a backend with a trainer"
    )


def pytest_collection_modifyitems(items):
    # keras' conftest.py: the trainer does not exist on NumPy and OpenVINO.
    needs_trainer = pytest.mark.skipif(
        keras.backend.backend() in ("numpy", "openvino"),
        reason="Trainer not implemented for NumPy and OpenVINO backend.",
    )
    view = _LayersWithManualBatchNorm("keras.src.layers")
    for item in items:
        item.module.layers = view
        if "requires_trainable_backend" in item.keywords:
            item.add_marker(needs_trainer)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(
        f"ManualBatchNorm layers constructed: {constructed} "
        f"(backend {keras.backend.backend()})"
    )
