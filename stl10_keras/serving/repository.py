"""The model repository: the versions of one model base path, loaded and hot-swapped.

One `ModelRepository` serves both front ends (REST and gRPC): it loads the
highest version that loads, polls the base path for new ones, and answers
status and metadata requests in TF Serving's terms.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from stl10_keras.export import IMAGE_BYTES_INPUT, list_versions
from stl10_keras.serving.errors import NoVersionError, RequestError
from stl10_keras.serving.errors import one_line as _one_line


@dataclass
class Servable:
    """One loaded SavedModel version.

    Args:
        version: the version number (its folder name).
        path: the version folder.
        signatures: signature name -> concrete function (`loaded.signatures`).
        signature_defs: signature name -> TF Serving's metadata JSON of it.
        loaded: the `tf.saved_model.load` object; keeps the variables alive.
    """

    version: int
    path: Path
    signatures: dict[str, Any]
    signature_defs: dict[str, Any]
    loaded: Any


def _signature_defs_json(path: Path) -> dict[str, Any]:
    """The signature defs in `path/saved_model.pb`, as TF Serving's metadata shows."""
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((path / "saved_model.pb").read_bytes())

    def tensor(info):
        shape = info.tensor_shape
        return {
            "dtype": types_pb2.DataType.Name(info.dtype),
            "tensor_shape": {"dim": [{"size": str(d.size), "name": d.name}
                                     for d in shape.dim],
                             "unknown_rank": shape.unknown_rank},
            "name": info.name,
        }

    defs = {}
    for name, sig in proto.meta_graphs[0].signature_def.items():
        if name.startswith("__"):  # __saved_model_init_op: not servable
            continue
        defs[name] = {
            "inputs": {k: tensor(v) for k, v in sorted(sig.inputs.items())},
            "outputs": {k: tensor(v) for k, v in sorted(sig.outputs.items())},
            "method_name": sig.method_name,
        }
    return defs


def _warmup_inputs(fn) -> dict[str, Any] | None:
    """A batch of one zero example per input (a 1x1 PNG for `image_bytes`)."""
    import tensorflow as tf

    inputs = {}
    for name, spec in fn.structured_input_signature[1].items():
        if spec.dtype == tf.string:
            if name != IMAGE_BYTES_INPUT or spec.shape.rank != 1:
                return None
            pixel = tf.io.encode_png(tf.zeros([1, 1, 3], tf.uint8))
            inputs[name] = tf.expand_dims(pixel, 0)
        elif spec.shape.rank is None:
            return None
        else:
            shape = [1 if d is None else d for d in spec.shape]
            inputs[name] = tf.zeros(shape, spec.dtype)
    return inputs


def load_servable(path: str | os.PathLike, version: int) -> Servable:
    """Load one version and run each signature once, so the first request is fast.

    Args:
        path: the version folder (holds `saved_model.pb`).
        version: its version number.

    Returns:
        The `Servable`.

    Raises:
        Exception: whatever `tf.saved_model.load` or the warm-up raise for a
            version that cannot be served.
    """
    from stl10_keras.io_utils import import_tensorflow

    tf = import_tensorflow()
    path = Path(path)
    loaded = tf.saved_model.load(str(path))
    signatures = dict(loaded.signatures)
    if not signatures:
        raise ValueError("the SavedModel has no signatures")
    for fn in signatures.values():
        inputs = _warmup_inputs(fn)
        if inputs is not None:
            fn(**inputs)
    return Servable(version, path, signatures, _signature_defs_json(path), loaded)


def _version_stamp(path: Path) -> float:
    """Latest change time of a version folder and its direct entries (a copy in
    progress adds files to `variables/`, not to the version folder itself)."""
    stamps = [path.stat().st_mtime]
    for child in path.iterdir():
        stamps.append(child.stat().st_mtime)
    return max(stamps)


class ModelRepository:
    """The versions of one model base path; serves the highest one that loads.

    Like TF Serving's default version policy (`latest: 1`): a newly pushed
    higher version replaces the served one once it has loaded; a version that
    fails to load is reported and skipped until its files change; if the served
    version's folder is deleted, the highest remaining one is loaded.

    Args:
        base_path: the model base path, `saved_models/NAME`.
        name: the model name in the URLs (default: the base path's folder name).
        log: where warnings go (one line each).
        freeze_gc: after each load, collect garbage once and `gc.freeze()` what
            is left. With TensorFlow loaded a full collection walks ~400,000
            objects (0.5 s on a 2-core EPYC), and the lists a JSON request
            allocates trigger one every few requests: a p99 of 0.5 s instead of
            50 ms for batches of 32 images. For a server process only (freezing
            is process-wide).
    """

    def __init__(self, base_path: str | os.PathLike, name: str | None = None,
                 log: Callable[[str], None] | None = None, freeze_gc: bool = False):
        self.base_path = Path(base_path)
        self.name = name or self.base_path.resolve().name
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._freeze_gc = freeze_gc
        self._lock = threading.Lock()  # guards _current and _states
        self._load_lock = threading.Lock()  # one load at a time
        self._current: Servable | None = None
        # version -> (state, error_code, error_message), as TF Serving reports them.
        self._states: dict[int, tuple[str, str, str]] = {}
        self._failed: dict[int, float] = {}  # version -> stamp of the failed try
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    @property
    def current(self) -> Servable:
        """The served version."""
        with self._lock:
            if self._current is None:
                raise RuntimeError("ModelRepository.start() has not loaded a version.")
            return self._current

    def start(self) -> Servable:
        """Load the highest version that loads.

        Raises:
            NoVersionError: the base path is missing, empty, or no version loads.
        """
        base = self.base_path
        if base.exists() and not base.is_dir():
            raise NoVersionError(
                f"{base} is a file, not a folder; pass the --model-base-path of an "
                "exported model (saved_models/NAME, which holds 1/, 2/, ...).")
        if not base.is_dir():
            raise NoVersionError(
                f"{base} does not exist; pass the --model-base-path of an exported "
                "model (saved_models/NAME, which holds 1/, 2/, ...).")
        if not list_versions(base):
            raise NoVersionError(
                f"{base} holds no version folder with a saved_model.pb (1/, 2/, ...); "
                "export a model into it first (python -m stl10_keras.train).")
        self.refresh()
        if self._current is None:
            reasons = "; ".join(f"version {v}: {msg}" for v, (_, _, msg)
                                in sorted(self._states.items(), reverse=True))
            raise NoVersionError(
                f"No version under {base} could be loaded ({reasons}).")
        return self._current

    def refresh(self) -> bool:
        """Serve the highest version that loads, if it is not served already.

        Returns:
            Whether the served version changed.
        """
        with self._load_lock:
            for version in reversed(list_versions(self.base_path)):
                served = self._current.version if self._current else None
                if version == served:
                    return False
                path = self.base_path / str(version)
                try:
                    stamp = _version_stamp(path)
                except OSError:  # removed while we looked
                    continue
                if self._failed.get(version) == stamp:
                    continue
                try:
                    servable = load_servable(path, version)
                except Exception as e:  # any broken version: keep serving the old one
                    self._failed[version] = stamp
                    with self._lock:
                        self._states[version] = ("END", "UNKNOWN", _one_line(e))
                    still = f"; still serving version {served}" if served else ""
                    self._log(f"warning: version {version} of model '{self.name}' "
                              f"did not load ({_one_line(e)}){still}.")
                    continue
                self._failed.pop(version, None)
                with self._lock:
                    self._current = servable
                    self._states[version] = ("AVAILABLE", "OK", "")
                    if served is not None:
                        self._states[served] = ("END", "OK", "")
                if self._freeze_gc:  # unfreeze first, so the old version is freed
                    gc.unfreeze()
                    gc.collect()
                    gc.freeze()
                if served is not None:
                    self._log(f"Serving model '{self.name}' version {version} "
                              f"(was {served}).")
                return True
        return False

    def start_polling(self, seconds: float) -> None:
        """Call `refresh` every `seconds` in a background thread until `stop`."""
        def poll():
            while not self._stop.wait(seconds):
                try:
                    self.refresh()
                except Exception as e:  # a poll must never end the poller
                    self._log(f"warning: polling {self.base_path} failed "
                              f"({_one_line(e)}).")

        self._poller = threading.Thread(target=poll, name="version-poller", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        """Stop the poller (a load in progress finishes in the background)."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=1.0)

    def get(self, version: str | None) -> Servable:
        """The servable for a request: the served one, or 404 for another version."""
        current = self.current
        if version is None:
            return current
        if not version.isdigit():
            raise RequestError(400, f"Version '{version}' is not a number; address a "
                               "version as /versions/2.")
        if int(version) == current.version:
            return current
        with self._lock:
            known = int(version) in self._states
        if known:
            raise RequestError(404, f"Version {version} of model '{self.name}' is not "
                               f"loaded; the server serves version {current.version}.")
        raise RequestError(404, f"Model '{self.name}' has no version {version}; the "
                           f"server serves version {current.version}.")

    def status(self, version: str | None = None) -> dict[str, Any]:
        """TF Serving's `GET /v1/models/NAME[/versions/V]` response, newest first."""
        if version is not None and not version.isdigit():
            raise RequestError(400, f"Version '{version}' is not a number; address a "
                               "version as /versions/2.")
        with self._lock:
            states = sorted(self._states.items(), reverse=True)
        if version is not None:
            states = [(v, s) for v, s in states if v == int(version)]
            if not states:
                raise RequestError(
                    404, f"Model '{self.name}' has no version {version}.")
        return {"model_version_status": [
            {"version": str(v), "state": state,
             "status": {"error_code": code, "error_message": message}}
            for v, (state, code, message) in states]}

    def metadata(self, version: str | None = None) -> dict[str, Any]:
        """TF Serving's `GET /v1/models/NAME[/versions/V]/metadata` response."""
        servable = self.get(version)
        return {
            "model_spec": {"name": self.name, "signature_name": "",
                           "version": str(servable.version)},
            "metadata": {"signature_def": {"signature_def": servable.signature_defs}},
        }
