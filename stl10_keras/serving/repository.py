"""The model repository: the versions of one model base path, loaded and hot-swapped.

One `ModelRepository` serves both front ends (REST and gRPC): it loads the
highest version that loads (and any version a label names), polls the base path
for new ones, and answers status and metadata in TF Serving's terms.

A version is loaded once its files have stopped changing for `settle_seconds`
(a slow `cp`/`scp`/`gsutil` copy is not tried half-written), and a version that
failed to load is tried again when any file under it changes (size or mtime).
"""

from __future__ import annotations

import gc
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from stl10_keras.errors import NoVersionError, one_line
from stl10_keras.export import IMAGE_BYTES_INPUT, base_path_hint, list_versions
from stl10_keras.serving.errors import RequestError, clip

#: TF Serving's versions are int64 (`absl::SimpleAtoi` into `int64_t`).
MAX_VERSION = 2**63 - 1
#: How long a new version's files must stay unchanged before it is loaded.
DEFAULT_SETTLE_SECONDS = 1.0


def parse_version(text: str) -> int:
    """A version from a URL: ASCII digits that fit an int64, as TF Serving takes.

    Args:
        text: the `V` of `/versions/V`.

    Returns:
        The version number.

    Raises:
        RequestError: 400 for anything else (`²`, `١`, `-1`, 20 digits, ...).
    """
    # `str.isdigit()` and `int()` accept other scripts' digits; TF Serving's
    # `\d+` (RE2) and SimpleAtoi take ASCII only.
    if not re.fullmatch(r"[0-9]+", text):
        raise RequestError(400, f"Version '{clip(text)}' is not a number; address a "
                           "version as /versions/2.")
    digits = text.lstrip("0") or "0"
    # Checked by length first: int() refuses more than 4,300 digits.
    if len(digits) > len(str(MAX_VERSION)) or int(digits) > MAX_VERSION:
        raise RequestError(400, f"Failed to convert version: {clip(text)} to numeric; "
                           "a version is a whole number below 2**63.")
    return int(digits)


@dataclass
class Servable:
    """One loaded SavedModel version.

    Args:
        version: the version number (its folder name).
        path: the version folder.
        signatures: signature name -> concrete function (`loaded.signatures`).
        signature_def_map: TF Serving's `SignatureDefMap` proto of its servable
            signatures (what gRPC's GetModelMetadata returns).
        signature_defs: the same as TF Serving's REST metadata JSON.
        loaded: the `tf.saved_model.load` object; keeps the variables alive.
    """

    version: int
    path: Path
    signatures: dict[str, Any]
    signature_def_map: Any
    signature_defs: dict[str, Any]
    loaded: Any


def _signature_def_map(path: Path) -> tuple[Any, dict[str, Any]]:
    """The signature defs in `path/saved_model.pb` as TF Serving's `SignatureDefMap`
    and as the JSON its REST metadata prints (protobuf's JSON of that message,
    field names kept, empty fields printed: `"defaults": {}`)."""
    from google.protobuf import json_format
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow_serving.apis import get_model_metadata_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((path / "saved_model.pb").read_bytes())
    defs = get_model_metadata_pb2.SignatureDefMap()
    for name, sig in proto.meta_graphs[0].signature_def.items():
        if not name.startswith("__"):  # __saved_model_init_op: not servable
            defs.signature_def[name].CopyFrom(sig)
    as_json = json_format.MessageToDict(
        defs, always_print_fields_with_no_presence=True,
        preserving_proto_field_name=True)
    return defs, as_json.get("signature_def", {})


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
    return Servable(version, path, signatures, *_signature_def_map(path), loaded)


def _files_stamp(path: Path) -> tuple[tuple[str, int, int], ...]:
    """(relative path, size, mtime in ns) of every file under a version folder: a
    copy in progress changes it, however deep the file it writes."""
    entries = []
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            info = os.stat(full)
            entries.append((os.path.relpath(full, path), info.st_size,
                            info.st_mtime_ns))
    return tuple(sorted(entries))


class ModelRepository:
    """The versions of one model base path; serves the highest one that loads.

    Like TF Serving's default version policy (`latest: 1`): a newly pushed
    higher version replaces the served one once it has loaded; a version that
    fails to load is reported and skipped until a file under it changes; if the
    served version's folder is deleted, the highest remaining one is served.
    Versions that `labels` name are loaded and kept as well (TF Serving's
    `version_labels` with a `specific` policy), so `/labels/stable` reaches them.

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
        labels: version label -> version number (`--version-labels`).
        settle_seconds: a version found while polling is loaded once its files
            have not changed for this long.
    """

    def __init__(self, base_path: str | os.PathLike, name: str | None = None,
                 log: Callable[[str], None] | None = None, freeze_gc: bool = False,
                 labels: dict[str, int] | None = None,
                 settle_seconds: float = DEFAULT_SETTLE_SECONDS):
        self.base_path = Path(base_path)
        self.name = name or self.base_path.resolve().name
        self.labels = dict(labels or {})
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._freeze_gc = freeze_gc
        self._settle_seconds = settle_seconds
        self._lock = threading.Lock()  # guards _servables, _latest and _states
        self._load_lock = threading.Lock()  # one refresh at a time
        self._servables: dict[int, Servable] = {}
        self._latest: int | None = None
        # version -> (state, error_code, error_message), as TF Serving reports them.
        self._states: dict[int, tuple[str, str, str]] = {}
        self._failed: dict[int, tuple] = {}  # version -> files stamp of the failed try
        self._seen: dict[int, tuple[tuple, float]] = {}  # version -> (stamp, since)
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    @property
    def current(self) -> Servable:
        """The served (latest) version."""
        with self._lock:
            if self._latest is None:
                raise RuntimeError("ModelRepository.start() has not loaded a version.")
            return self._servables[self._latest]

    def loaded_versions(self) -> list[int]:
        """The versions loaded now, ascending."""
        with self._lock:
            return sorted(self._servables)

    def start(self) -> Servable:
        """Load the highest version that loads (and the labelled ones), now.

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
            raise NoVersionError(base_path_hint(base, "--model-base-path") or (
                f"{base} holds no version folder with a saved_model.pb (1/, 2/, ...); "
                "export a model into it first (python -m stl10_keras.train)."))
        self.refresh(settle=False)
        if self._latest is None:
            reasons = "; ".join(f"version {v}: {msg}" for v, (_, _, msg)
                                in sorted(self._states.items(), reverse=True))
            raise NoVersionError(
                f"No version under {base} could be loaded ({reasons}).")
        return self.current

    def refresh(self, settle: bool = True) -> bool:
        """Serve the highest version that loads, and load the labelled versions.

        Args:
            settle: load a version only once its files have stopped changing
                (False at start-up: what is there is taken as it is).

        Returns:
            Whether the served (latest) version changed.
        """
        with self._load_lock:
            versions = list_versions(self.base_path)
            before = set(self._servables)
            latest = None
            for version in reversed(versions):
                if version in self._servables or self._try_load(version, settle):
                    latest = version
                    break
            for version in sorted(set(self.labels.values()) & set(versions)):
                if version not in self._servables:
                    self._try_load(version, settle)
            previous = self._latest
            if latest is None:  # nothing loads: keep serving what is served
                latest = previous
            keep = ({latest} | set(self.labels.values())) & set(versions)
            keep.add(latest)
            with self._lock:
                self._latest = latest
                for version in [v for v in self._servables if v not in keep]:
                    del self._servables[version]
                    self._states[version] = ("END", "OK", "")
            if self._freeze_gc and set(self._servables) != before:
                # Unfreeze first, so unloaded versions are freed; only after a
                # change: a full collection takes ~0.5 s with TensorFlow loaded.
                gc.unfreeze()
                gc.collect()
                gc.freeze()
            if previous is not None and latest != previous:
                self._log(f"Serving model '{self.name}' version {latest} "
                          f"(was {previous}).")
            return latest != previous

    def _try_load(self, version: int, settle: bool) -> bool:
        """Load `version` unless it failed with these very files or is still
        being written; returns whether it is now loaded."""
        path = self.base_path / str(version)
        try:
            stamp = _files_stamp(path)
        except OSError:  # removed while we looked
            return False
        if self._failed.get(version) == stamp:
            return False
        if settle:
            seen = self._seen.get(version)
            now = time.monotonic()
            if seen is None or seen[0] != stamp:
                self._seen[version] = (stamp, now)
                return False
            if now - seen[1] < self._settle_seconds:
                return False
        try:
            servable = load_servable(path, version)
        except Exception as e:  # any broken version: keep serving the old one
            self._failed[version] = stamp
            with self._lock:
                self._states[version] = ("END", "UNKNOWN", one_line(e))
            served = self._latest
            still = f"; still serving version {served}" if served is not None else ""
            self._log(f"warning: version {version} of model '{self.name}' "
                      f"did not load ({one_line(e)}){still}; it is tried again "
                      "when its files change.")
            return False
        self._failed.pop(version, None)
        self._seen.pop(version, None)
        with self._lock:
            self._servables[version] = servable
            self._states[version] = ("AVAILABLE", "OK", "")
        return True

    def start_polling(self, seconds: float) -> None:
        """Call `refresh` every `seconds` in a background thread until `stop`."""
        def poll():
            while not self._stop.wait(seconds):
                try:
                    self.refresh()
                except Exception as e:  # a poll must never end the poller
                    self._log(f"warning: polling {self.base_path} failed "
                              f"({one_line(e)}).")

        self._poller = threading.Thread(target=poll, name="version-poller", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        """Stop the poller (a load in progress finishes in the background)."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=1.0)

    def check_name(self, name: str) -> None:
        """404 unless `name` is this repository's model name."""
        if name != self.name:
            raise RequestError(404, f"Model '{clip(name)}' is not served here; this "
                               f"server serves '{self.name}'.")

    def get(self, version: int | None = None, label: str | None = None) -> Servable:
        """The servable a request names: the latest, a version, or a label's version.

        Raises:
            RequestError: 400 for an unknown label, 404 for a version not loaded.
        """
        if label is not None:
            version = self.version_of_label(label)
        with self._lock:
            latest = self._servables[self._latest]
            if version is None:
                return latest
            servable = self._servables.get(version)
            known = version in self._states
        if servable is not None:
            return servable
        named = f"Version {version}" + (f" (label '{label}')" if label else "")
        if known:
            raise RequestError(404, f"{named} of model '{self.name}' is not loaded; "
                               f"the server serves version {latest.version}.")
        raise RequestError(404, f"Model '{self.name}' has no version {version}; the "
                           f"server serves version {latest.version}.")

    def version_of_label(self, label: str) -> int:
        """The version a label names (TF Serving: 400 for a label it does not know)."""
        if label not in self.labels:
            known = (f"this server's labels are {sorted(self.labels)}" if self.labels
                     else "start the server with --version-labels LABEL=VERSION")
            raise RequestError(400, f"Unrecognized servable version label: "
                               f"'{clip(label)}'; {known}.")
        return self.labels[label]

    def version_states(self, version: int | None = None
                       ) -> list[tuple[int, str, str, str]]:
        """`(version, state, error_code, error_message)`, newest first: all versions
        tried, or the one asked for (a label is ignored, as TF Serving does).

        Raises:
            RequestError: 404 for a version never seen.
        """
        with self._lock:
            states = sorted(self._states.items(), reverse=True)
        if version is not None:
            states = [(v, s) for v, s in states if v == version]
            if not states:
                raise RequestError(
                    404, f"Model '{self.name}' has no version {version}.")
        return [(v, *s) for v, s in states]

    def status(self, version: int | None = None) -> dict[str, Any]:
        """TF Serving's `GET /v1/models/NAME[/versions/V]` response."""
        return {"model_version_status": [
            {"version": str(v), "state": state,
             "status": {"error_code": code, "error_message": message}}
            for v, state, code, message in self.version_states(version)]}

    def metadata(self, version: int | None = None, label: str | None = None
                 ) -> dict[str, Any]:
        """TF Serving's `GET /v1/models/NAME[/versions/V]/metadata` response."""
        servable = self.get(version, label)
        return {
            "model_spec": {"name": self.name, "signature_name": "",
                           "version": str(servable.version)},
            "metadata": {"signature_def": {"signature_def": servable.signature_defs}},
        }
