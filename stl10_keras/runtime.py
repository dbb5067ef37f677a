"""One start-up routine for every entry point: log level, quiet TensorFlow, devices.

Every command (`train`, `ablation`, `embed`, `predict`, `serve`, `gradcheck`,
`pipelines.run`) calls `start()` first, runs the checks that need no
TensorFlow, and only then loads keras with `load_keras()`: a mistake a user
made is then the only line they see, in a fraction of a second, instead of
TensorFlow's native start-up logs followed by the sentence.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

# 3, not 2: also hides the C++ errors TensorFlow logs on a machine without CUDA
# ("failed call to cuInit"). A user's own setting wins; `device_summary` says
# which devices are in use, so a GPU whose driver fails is still noticed.
DEFAULT_TF_LOG_LEVEL = "3"


def start() -> None:
    """Set the entry points' defaults; call before anything imports TensorFlow."""
    import warnings

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", DEFAULT_TF_LOG_LEVEL)
    # A library's warning (scikit-learn's k-means, keras) reaches the user as
    # one line, not as Python's "FILE:LINE: Category: text" and a source line,
    # and once: Python's own once-per-place rule forgets what it showed
    # whenever a library changes the warning filters.
    warnings.formatwarning = format_warning
    warnings.showwarning = show_warning


def format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the commands print it: `warning: TEXT` on one line."""
    text = " ".join(str(message).split())
    return f"warning: {text}\n"


_SHOWN: set[str] = set()


def show_warning(message, category, filename, lineno, file=None,
                 line=None) -> None:
    """Print `format_warning`'s line to stderr, each text once per process."""
    import sys

    text = format_warning(message, category, filename, lineno)
    if text in _SHOWN:
        return
    _SHOWN.add(text)
    try:
        (file or sys.stderr).write(text)
    except OSError:  # stderr closed: a warning is not worth a crash
        pass


def tensorflow_installed() -> bool:
    """Whether TensorFlow is installed, without importing it (seconds faster).

    An import hook that refuses it (`find_spec` raising ImportError) counts as
    not installed, as it does for `tensorflow_available`.
    """
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


def tensorflow_available() -> bool:
    """Whether TensorFlow can be imported (it is optional under the JAX backend).

    Imports it, with `io_utils.import_tensorflow` (its start-up logs filtered).
    """
    from stl10_keras.io_utils import import_tensorflow

    try:
        import_tensorflow()
    except ImportError:
        return False
    return True


def load_keras() -> ModuleType:
    """Import keras after loading TensorFlow quietly (when it is installed).

    keras imports TensorFlow itself under the TensorFlow backend (and
    tensorflow-datasets under any); doing it first here filters its native
    start-up logs (`io_utils.filtered_startup_logs`).
    """
    tensorflow_available()
    import keras

    return keras


def device_summary(devices: tuple[str, ...] = ()) -> str:
    """The devices training uses, in words, e.g. `1 GPU (gpu:0)` or `the CPU`.

    Args:
        devices: the devices `--devices` chose (empty: the backend's default).
    """
    keras = load_keras()
    if devices:
        return f"{len(devices)} devices ({', '.join(devices)})"
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        gpus = [str(d) for d in jax.local_devices() if d.platform != "cpu"]
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    else:
        return f"the {backend} backend's default device"
    if gpus:
        return f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''} ({', '.join(gpus)})"
    return ("the CPU (no GPU visible; TF_CPP_MIN_LOG_LEVEL=0 shows TensorFlow's "
            "CUDA messages)" if backend == "tensorflow" else "the CPU (no GPU visible)")
