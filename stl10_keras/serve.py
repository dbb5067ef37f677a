"""`python -m stl10_keras.serve`: TF Serving's REST API for a SavedModel base path.

Serves `saved_models/NAME/` (TF Serving's layout, `NAME/VERSION/`) so that a TF
Serving client works unchanged:

    GET  /v1/models/NAME[/versions/V]            version status
    GET  /v1/models/NAME[/versions/V]/metadata   signature defs
    POST /v1/models/NAME[/versions/V]:predict    {"instances": ...} or {"inputs": ...}

Binary values are sent as `{"b64": "..."}` (the `serving_bytes` signature's
`image_bytes`). The highest version that loads is served; a poller picks up a
newly pushed version without a restart. Every error is `{"error": "<sentence>"}`
with a 4xx status when the client can fix it.

The HTTP layer is a Flask app on waitress (a threaded, production WSGI server);
the request handling (`ModelRepository`, `predict`) has no HTTP in it.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import gc
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from stl10_keras.export import IMAGE_BYTES_INPUT, check_encoded_image, list_versions

DEFAULT_SIGNATURE = "serving_default"
DEFAULT_MAX_BODY_MB = 16.0
DEFAULT_THREADS = 8
# TF Serving's REST routes, as its own handler matches them.
_ROUTE = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<suffix>/metadata|:[A-Za-z]+)?$"
)


class RequestError(Exception):
    """A request the server will not answer: an HTTP status and one sentence."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class NoVersionError(Exception):
    """The model base path holds no version that loads; the message names the fix."""


def _one_line(error: BaseException, limit: int = 300) -> str:
    """The informative line of an exception (TensorFlow's span many lines)."""
    lines = [ln.strip() for ln in str(error).splitlines()]
    skip = ("Graph execution error", "Detected at node", "<stack traces", "[[")
    useful = [ln for ln in lines if ln and not ln.startswith(skip)]
    text = (useful[-1] if useful else type(error).__name__).rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------
# Loaded versions
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# :predict
# --------------------------------------------------------------------------------------


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and "b64" in value


def _shape_text(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def _numeric_input(name: str, value: Any, spec, row: bool,
                   dtype_name: str) -> np.ndarray:
    """A JSON array -> a numpy array of the input's dtype, or a `RequestError`."""
    dtype = np.dtype(spec.dtype.as_numpy_dtype)
    want = list(spec.shape)  # [None, H, W, C]
    what = f"'{name}' ({dtype_name} {_shape_text(want)})"
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        array = None  # ragged: rows of different lengths
    if array is not None and array.dtype == object and dtype.kind in "iu":
        # Rectangular, but an integer beyond 64 bits made numpy keep Python ints.
        huge = [v for v in array.flat if isinstance(v, int) and not isinstance(v, bool)
                and not np.iinfo(dtype).min <= v <= np.iinfo(dtype).max]
        if huge and all(isinstance(v, (int, float)) for v in array.flat):
            info = np.iinfo(dtype)
            raise RequestError(400, f"Input '{name}' must hold whole numbers "
                               f"{info.min}..{info.max} ({dtype_name}); found "
                               f"{huge[0]!r}.")
    if array is None or array.dtype == object:
        if row and isinstance(value, list):
            for i, item in enumerate(value):
                try:
                    shape = np.shape(item)
                except ValueError:
                    raise RequestError(400, f"Instance {i} of {what} is not a "
                                       "rectangular array of numbers.") from None
                if list(shape) != want[1:]:
                    raise RequestError(400, f"Instance {i} of '{name}' has shape "
                                       f"{list(shape)}; each instance must be "
                                       f"{_shape_text(want[1:])}.")
        raise RequestError(400, f"Input {what} must be a rectangular array of numbers.")
    kind = array.dtype.kind
    if kind not in "iuf" and not (kind == "b" and dtype == bool):
        found = {"U": "strings", "b": "booleans"}.get(kind, "non-numbers")
        raise RequestError(400, f"Input {what} must hold numbers; found {found}.")
    if array.ndim != len(want) or any(w is not None and w != d
                                      for w, d in zip(want, array.shape)):
        if row and array.ndim >= 1:
            raise RequestError(400, f"Instances of '{name}' have shape "
                               f"{list(array.shape[1:])}; each instance must be "
                               f"{_shape_text(want[1:])}.")
        raise RequestError(400, f"Input '{name}' has shape {list(array.shape)}; it "
                           f"must be {_shape_text(want)}.")
    if array.size and dtype.kind in "iu" and kind != "b":
        info = np.iinfo(dtype)
        if kind == "f":
            bad = array[~np.isfinite(array) | (array != np.floor(array))]
            if bad.size:
                raise RequestError(400, f"Input '{name}' must hold whole numbers "
                                   f"{info.min}..{info.max} ({dtype_name}); found "
                                   f"{bad.flat[0].item()!r}.")
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            found = low if low < info.min else high
            raise RequestError(400, f"Input '{name}' must hold whole numbers "
                               f"{info.min}..{info.max} ({dtype_name}); found "
                               f"{found.item()!r}.")
    return array.astype(dtype)


def _string_input(name: str, value: Any, spec, row: bool) -> list[bytes]:
    """Strings or `{"b64": ...}` -> bytes; encoded images are checked by header."""
    if spec.shape.rank != 1:
        raise RequestError(400, f"Input '{name}' is a string tensor of rank "
                           f"{spec.shape.rank}; this server takes rank-1 strings only.")
    label = "Instance" if row else "Element"
    if not isinstance(value, list):
        raise RequestError(400, f"Input '{name}' must be a list of strings or "
                           '{"b64": "..."} objects, one per example.')
    out = []
    for i, item in enumerate(value):
        if _is_b64(item):
            if not isinstance(item["b64"], str):
                raise RequestError(400, f'{label} {i} of \'{name}\': "b64" must be a '
                                   "string.")
            try:
                data = base64.b64decode(item["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise RequestError(400, f"{label} {i} of '{name}' is not valid base64."
                                   ) from None
        elif isinstance(item, str):
            data = item.encode("utf-8")
        else:
            raise RequestError(400, f"{label} {i} of '{name}' must be a string or "
                               f'{{"b64": "..."}}; found {type(item).__name__}.')
        if name == IMAGE_BYTES_INPUT:
            try:
                check_encoded_image(data)
            except ValueError as e:
                raise RequestError(400, f"{label} {i} of '{name}' {e}.") from None
        out.append(data)
    return out


def _columns(body: dict[str, Any], signature: str, names: list[str]
             ) -> tuple[dict[str, Any], bool]:
    """The request's value for each input, and whether it is in row format."""
    has_rows, has_cols = "instances" in body, "inputs" in body
    if has_rows and has_cols:
        raise RequestError(400, "Send either 'instances' (row format) or 'inputs' "
                           "(columnar format), not both.")
    if not has_rows and not has_cols:
        raise RequestError(400, "The request needs 'instances' (row format) or "
                           "'inputs' (columnar format).")
    takes = f"signature '{signature}' takes {names}"
    if has_cols:
        inputs = body["inputs"]
        if isinstance(inputs, dict) and not _is_b64(inputs):
            if sorted(inputs) != sorted(names):
                raise RequestError(400, f"'inputs' has keys {sorted(inputs)}; {takes}.")
            return dict(inputs), False
        if len(names) != 1:
            raise RequestError(400, f"'inputs' must be an object; {takes}.")
        return {names[0]: inputs}, False
    instances = body["instances"]
    if not isinstance(instances, list):
        raise RequestError(400, "'instances' must be a list, one entry per example.")
    if not instances:
        raise RequestError(400, "'instances' is empty; send at least one example.")
    columns: dict[str, list] = {n: [] for n in names}
    for i, instance in enumerate(instances):
        if isinstance(instance, dict) and not _is_b64(instance):
            if sorted(instance) != sorted(names):
                raise RequestError(400, f"Instance {i} has keys {sorted(instance)}; "
                                   f"{takes}.")
            for n in names:
                columns[n].append(instance[n])
        elif len(names) == 1:
            columns[names[0]].append(instance)
        else:
            raise RequestError(400, f"Instance {i} must be an object; {takes}.")
    return columns, True


def _output_json(name: str, array: np.ndarray) -> Any:
    """A tensor as JSON: strings as text, or `{"b64"}` for `*_bytes` and non-UTF-8."""
    if array.dtype != object:
        return array.tolist()

    def text(value: bytes) -> Any:
        if not name.endswith("_bytes"):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                pass
        return {"b64": base64.b64encode(value).decode("ascii")}

    return np.frompyfunc(text, 1, 1)(array).tolist()


def _locate_bad_image(values: list[bytes]) -> int | None:
    """The index of the first image `tf.io.decode_image` rejects (error path only)."""
    import tensorflow as tf

    for i, data in enumerate(values):
        try:
            tf.io.decode_image(data, channels=3, expand_animations=False)
        except tf.errors.InvalidArgumentError:
            return i
    return None


def predict(servable: Servable, body: Any) -> dict[str, Any]:
    """Answer a TF Serving predict request.

    Args:
        servable: the version to run.
        body: the parsed JSON body: `{"signature_name"?, "instances": [...]}`
            (row format) or `{"signature_name"?, "inputs": ...}` (columnar).

    Returns:
        `{"predictions": [...]}` (one entry per instance; a dict of outputs when
        the signature has several) or `{"outputs": ...}` (a dict of outputs).

    Raises:
        RequestError: the request does not fit the signature (HTTP 400).
    """
    import tensorflow as tf

    if not isinstance(body, dict):
        raise RequestError(400, "The request body must be a JSON object with "
                           "'instances' or 'inputs'.")
    signature = body.get("signature_name", DEFAULT_SIGNATURE)
    if not isinstance(signature, str) or signature not in servable.signatures:
        raise RequestError(400, f"Unknown signature_name {signature!r}; this model "
                           f"has {sorted(servable.signatures)}.")
    fn = servable.signatures[signature]
    specs = fn.structured_input_signature[1]
    defs = servable.signature_defs.get(signature, {}).get("inputs", {})
    columns, row = _columns(body, signature, sorted(specs))
    tensors, strings = {}, {}
    for name, value in columns.items():
        spec = specs[name]
        if spec.dtype == tf.string:
            strings[name] = _string_input(name, value, spec, row)
            tensors[name] = tf.constant(strings[name], tf.string)
        else:
            dtype_name = defs.get(name, {}).get("dtype", spec.dtype.name)
            dtype_name = dtype_name.removeprefix("DT_").lower()
            array = _numeric_input(name, value, spec, row, dtype_name)
            tensors[name] = tf.constant(array)
    sizes = {int(t.shape[0]) for t in tensors.values()}
    if len(sizes) > 1:
        raise RequestError(
            400, f"The inputs have different batch sizes {sorted(sizes)}.")
    if 0 in sizes:
        raise RequestError(400, "The request holds no example; send at least one.")
    try:
        outputs = fn(**tensors)
    except tf.errors.InvalidArgumentError as e:
        bad = (_locate_bad_image(strings[IMAGE_BYTES_INPUT])
               if IMAGE_BYTES_INPUT in strings else None)
        if bad is not None:
            label = "Instance" if row else "Element"
            raise RequestError(400, f"{label} {bad} of '{IMAGE_BYTES_INPUT}' could not "
                               f"be decoded ({_one_line(e)}).") from None
        raise RequestError(400, f"Signature '{signature}' rejected the input "
                           f"({_one_line(e)}).") from None
    arrays = {k: v.numpy() for k, v in sorted(outputs.items())}
    if not row:
        if len(arrays) == 1:
            return {"outputs": _output_json(*next(iter(arrays.items())))}
        return {"outputs": {k: _output_json(k, a) for k, a in arrays.items()}}
    as_json = {k: _output_json(k, a) for k, a in arrays.items()}
    if len(as_json) == 1:
        return {"predictions": next(iter(as_json.values()))}
    n = next(iter(sizes))
    return {"predictions": [{k: v[i] for k, v in as_json.items()} for i in range(n)]}


# --------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _parse_json(data: bytes) -> Any:
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise RequestError(400, f"The request body is not valid JSON ({e.msg} at line "
                           f"{e.lineno} column {e.colno}).") from None
    except RecursionError:
        raise RequestError(400, "The request body is nested too deeply.") from None
    except ValueError as e:  # bad UTF-8, NaN/Infinity
        raise RequestError(400, f"The request body is not valid JSON ({_one_line(e)})."
                           ) from None


def _too_large(max_body_bytes: int) -> str:
    return (f"The request body is larger than this server's limit of "
            f"{max_body_bytes / 2**20:.4g} MB; send fewer instances per request or "
            "restart the server with a larger --max-body-mb.")


def make_app(repository: ModelRepository, max_body_bytes: int):
    """The Flask app of TF Serving's REST API over `repository`.

    Args:
        repository: the started `ModelRepository`.
        max_body_bytes: larger request bodies get HTTP 413.

    Returns:
        A `flask.Flask` WSGI app.
    """
    import flask
    from werkzeug.exceptions import HTTPException

    app = flask.Flask("stl10_keras.serve")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    api = f"/v1/models/{repository.name}[/versions/V][/metadata|:predict]"

    def reply(payload: dict[str, Any], status: int = 200):
        return flask.Response(json.dumps(payload), status, mimetype="application/json")

    @app.errorhandler(RequestError)
    def request_error(e: RequestError):
        return reply({"error": e.message}, e.status)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        messages = {
            404: f"Unknown path; the API is {api}.",
            405: "Use GET for status and metadata and POST for :predict.",
            413: _too_large(max_body_bytes),
        }
        message = messages.get(e.code, f"{e.name}: {e.description}")
        return reply({"error": message}, e.code or 500)

    @app.errorhandler(Exception)
    def internal_error(e: Exception):
        traceback.print_exc(file=sys.stderr)
        return reply({"error": f"Internal server error ({_one_line(e)})."}, 500)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]

    @app.route("/", defaults={"path": ""}, methods=methods)
    @app.route("/<path:path>", methods=methods)
    def dispatch(path: str):
        match = _ROUTE.match("/" + path)
        if match is None:
            raise RequestError(404, f"Unknown path '/{path}'; the API is {api}.")
        name, version = match["name"], match["version"]
        label, suffix = match["label"], match["suffix"]
        if name != repository.name:
            raise RequestError(404, f"Model '{name}' is not served here; this server "
                               f"serves '{repository.name}'.")
        if label is not None:
            raise RequestError(404, "Version labels are not supported; address a "
                               "version as /versions/N.")
        method = flask.request.method
        if suffix in (None, "/metadata"):
            if method not in ("GET", "HEAD"):
                what = "metadata" if suffix else "status"
                raise RequestError(405, f"Use GET for {what}.")
            if suffix is None:
                return reply(repository.status(version))
            return reply(repository.metadata(version))
        if suffix != ":predict":
            if suffix in (":classify", ":regress"):
                raise RequestError(400, f"{suffix} needs a classification or "
                                   "regression signature; this model has predict "
                                   "signatures, use :predict.")
            raise RequestError(404, f"Unknown method '{suffix}'; use :predict.")
        if method != "POST":
            raise RequestError(405, "Use POST for :predict.")
        servable = repository.get(version)  # 404 first: a bad URL, whatever the body
        body = _parse_json(flask.request.get_data(cache=False))
        return reply(predict(servable, body))

    return app


def _json_error_channel(max_body_bytes: int):
    """A waitress channel whose own error responses (413 before the body is read,
    malformed HTTP) are `{"error": ...}` JSON like the app's."""
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask

    class JSONErrorTask(ErrorTask):
        def execute(self):
            error = self.request.error
            message = (_too_large(max_body_bytes) if error.code == 413
                       else f"{error.reason}: {str(error.body).rstrip('.')}.")
            body = json.dumps({"error": message}).encode()
            self.status = f"{error.code} {error.reason}"
            self.response_headers.append(("Content-Type", "application/json"))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class JSONErrorChannel(HTTPChannel):
        error_task_class = JSONErrorTask

    return JSONErrorChannel


class ModelServer:
    """The REST API of a `ModelRepository` on waitress.

    Binds at construction (`port=0` picks a free port: see `.port`); `run()`
    serves until `close()` (from another thread) or Ctrl-C.

    Args:
        repository: the started `ModelRepository`.
        host: the address to bind; 127.0.0.1 keeps it off the network.
        port: the TCP port (0: any free one).
        threads: requests handled at the same time.
        max_body_bytes: larger request bodies get HTTP 413.
    """

    def __init__(self, repository: ModelRepository, host: str = "127.0.0.1",
                 port: int = 8501, threads: int = DEFAULT_THREADS,
                 max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20)):
        from waitress.server import create_server

        # waitress warns "Task queue depth is N" whenever all threads are busy.
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
        self.repository = repository
        self._server = create_server(
            make_app(repository, max_body_bytes), host=host, port=port,
            threads=threads,
            # Bodies up to 4x the limit are read (past 512 KB into a temp file)
            # and refused by Flask with a JSON 413: a client that sends its whole
            # body before reading the answer (urllib, requests) then gets it.
            # Larger ones waitress refuses from their headers, also as JSON, but
            # it closes the connection while such a client may still be sending.
            max_request_body_size=4 * max_body_bytes + 1,
            ident="stl10_keras.serve")
        self._server.channel_class = _json_error_channel(max_body_bytes)
        self._running = False
        self._closing = False
        listen = getattr(self._server, "effective_listen", None)
        if not listen:
            listen = [(self._server.effective_host, self._server.effective_port)]
        self.host, self.port = listen[0]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until `close()` or Ctrl-C."""
        self._running = True
        try:
            self._server.run()
        except OSError:
            # close() from another thread can close a socket while the loop's
            # select() still holds its descriptor (EBADF); that is the shutdown
            # asked for, not an error (webtest's StopableWSGIServer does the same).
            if not self._closing:
                raise
        finally:
            self._running = False

    def close(self) -> None:
        """Stop serving: close the sockets in the server's own loop, end the threads."""
        from waitress import wasyncore

        server = self._server
        self._closing = True
        sockets = getattr(server, "_map", None) or server.map
        trigger = getattr(server, "trigger", None)
        if trigger is not None and self._running:
            trigger.pull_trigger(lambda: wasyncore.close_all(sockets))
        else:
            wasyncore.close_all(sockets)
        server.task_dispatcher.shutdown()


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _positive(kind: type, most: float = 86400.0) -> Callable[[str], Any]:
    """A positive, finite number no larger than `most` (a day by default)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not 0 < value <= most:  # also refuses nan and inf
            raise argparse.ArgumentTypeError(
                f"must be a number in (0, {most:g}], got {text}")
        return value
    return parse


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port (0..65535)")
    return int(text)


def _host(text: str) -> str:
    # Resolved here, so a typo is a usage error before TensorFlow loads (waitress
    # would raise a bare ValueError after the model is loaded).
    try:
        socket.getaddrinfo(text, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise argparse.ArgumentTypeError(
            f"'{text}' does not resolve to an address; pass 127.0.0.1, 0.0.0.0 "
            "or an address of this machine") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stl10_keras.serve",
        description="Serve a SavedModel base path with TF Serving's REST API "
                    "(status, metadata, :predict); the highest version is served "
                    "and newly exported versions are picked up while running.")
    parser.add_argument("--model-base-path", required=True,
                        help="the model base path, saved_models/NAME (holds 1/, "
                             "2/, ...)")
    parser.add_argument("--model-name", default=None,
                        help="the NAME in /v1/models/NAME (default: the base path's "
                             "folder name)")
    parser.add_argument("--port", type=_port, default=8501,
                        help="TCP port (default 8501, TF Serving's REST port; 0: any "
                             "free port)")
    parser.add_argument("--host", type=_host, default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; "
                             "0.0.0.0 exposes it to the network)")
    parser.add_argument("--max-body-mb", type=_positive(float, most=4096),
                        default=DEFAULT_MAX_BODY_MB,
                        help=f"larger request bodies get HTTP 413 (default "
                             f"{DEFAULT_MAX_BODY_MB:g}; MB = 2**20 bytes)")
    parser.add_argument("--poll-seconds", type=_positive(float), default=1.0,
                        help="how often the base path is checked for a new version "
                             "(default 1, as TF Serving)")
    parser.add_argument("--threads", type=_positive(int, most=1024),
                        default=DEFAULT_THREADS,
                        help=f"requests handled at the same time (default "
                             f"{DEFAULT_THREADS})")
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C and SIGTERM stop the server, even where a shell started it in
        # the background with SIGINT ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _interrupt)
    repository = ModelRepository(args.model_base_path, args.model_name, freeze_gc=True)
    if not re.fullmatch(r"[^/:]+", repository.name):
        # TF Serving's URL cannot address it: /v1/models/NAME ends at '/' or ':'.
        print(f"error: the model name '{repository.name}' holds '/' or ':', so no URL "
              "can address it; pass a --model-name without them.", file=sys.stderr)
        return 2
    try:
        # A missing or empty base path fails here, before TensorFlow is loaded.
        servable = repository.start()
        try:
            server = ModelServer(repository, args.host, args.port, args.threads,
                                 int(args.max_body_mb * 2**20))
        except OSError as e:
            print(f"error: cannot listen on {args.host}:{args.port} "
                  f"({e.strerror or e}); pass another --port or --host.",
                  file=sys.stderr)
            return 1
        repository.start_polling(args.poll_seconds)
        print(f"Serving model '{repository.name}' version {servable.version} "
              f"({servable.path}) at {server.url}/v1/models/{repository.name}; "
              "Ctrl-C stops.", flush=True)
        server.run()  # returns on Ctrl-C (waitress catches KeyboardInterrupt)
    except NoVersionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    finally:
        repository.stop()
    print("Stopped.", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
