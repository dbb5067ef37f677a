"""Versions: parsing as TF Serving does, labels, and a version folder that is still
being copied while clients send requests.

References: numpy's int64 bounds, the SavedModels' own signatures, and a real
HTTP client on loopback.
"""

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import rest_server
from stl10_keras.config import preset
from stl10_keras.export import export_saved_model
from stl10_keras.model import build_model
from stl10_keras.serving.errors import RequestError
from stl10_keras.serving.repository import (
    ModelRepository,
    load_servable,
    parse_version,
)

NAME = "digits"
INT64_MAX = int(np.iinfo(np.int64).max)
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
X = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)


def call(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    try:
        with _OPENER.open(urllib.request.Request(url, data), timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("text, version", [
    ("1", 1), ("007", 7), (str(INT64_MAX), INT64_MAX), ("0" * 30 + "5", 5)])
def test_a_version_is_ascii_digits_that_fit_an_int64(text, version):
    assert parse_version(text) == version


@pytest.mark.parametrize("text, words", [
    ("\u00b2", "not a number"), ("\u0661", "not a number"), ("-1", "not a number"),
    ("", "not a number"), ("1 ", "not a number"), ("+1", "not a number"),
    (str(INT64_MAX + 1), "Failed to convert version"),
    ("9" * 5000, "Failed to convert version"),
])
def test_anything_else_is_a_400_with_one_sentence(text, words):
    with pytest.raises(RequestError) as info:
        parse_version(text)
    assert info.value.status == 400 and words in info.value.message
    assert len(info.value.message) < 200


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return build_model(preset("smoke", "digits"), (32, 32, 3))


def export(model, base, prefix):
    return export_saved_model(model, base, [f"{prefix}{i}" for i in range(10)])


@contextmanager
def serving(base, labels=None, poll=None, settle=1.0, log=None):
    repository = ModelRepository(base, NAME, labels=labels, settle_seconds=settle,
                                 log=log)
    repository.start()
    if poll:
        repository.start_polling(poll)
    with rest_server(repository, threads=8) as server:
        yield f"{server.url}/v1/models/{NAME}"


def test_version_labels_as_tf_serving(model, tmp_path):
    base = tmp_path / NAME
    for prefix in ("v1-", "v2-", "v3-"):
        export(model, base, prefix)
    with serving(base, labels={"stable": 1, "canary": 2}) as url:
        for label, version in (("stable", "1"), ("canary", "2")):
            status, body = call(f"{url}/labels/{label}:predict",
                                {"instances": X.tolist()})
            assert status == 200, body
            assert body["predictions"][0]["class_names"].startswith(f"v{version}-")
            status, body = call(f"{url}/labels/{label}/metadata")
            assert status == 200 and body["model_spec"]["version"] == version
        status, body = call(f"{url}:predict", {"instances": X.tolist()})
        assert body["predictions"][0]["class_names"].startswith("v3-")
        # Status ignores a label (TF Serving's GetModelStatus reads the version
        # only): every version, newest first.
        status, body = call(f"{url}/labels/nope")
        assert status == 200
        assert [s["version"] for s in body["model_version_status"]] == ["3", "2", "1"]
        assert {s["state"] for s in body["model_version_status"]} == {"AVAILABLE"}
        status, body = call(f"{url}/labels/nope:predict", {"instances": X.tolist()})
        assert status == 400 and "Unrecognized servable version label" in body["error"]


def _copy_in_two_halves(source, target, pause, chunks=5, chunk_seconds=0.3):
    """Copy a version folder as a slow copy does: the small files, then the
    variables data in chunks, a pause of `pause` seconds halfway, then the rest."""
    data = next((source / "variables").glob("variables.data-*"))
    for path in sorted(source.rglob("*")):
        if path.is_dir() or path == data:
            continue
        (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / path.relative_to(source))
    payload = data.read_bytes()
    half = len(payload) // 2
    with open(target / "variables" / data.name, "wb") as out:
        for i in range(chunks):  # the first half, still being written
            out.write(payload[i * half // chunks:(i + 1) * half // chunks])
            out.flush()
            time.sleep(chunk_seconds)
        time.sleep(pause)  # the copy stalls halfway: a half-written version
        out.write(payload[half:])


def test_a_version_copied_slowly_is_served_once_complete_without_failures(
        model, tmp_path, monkeypatch):
    base, staging = tmp_path / NAME, tmp_path / "staging"
    export(model, base, "v1-")
    logits = model.get_layer("logits")
    kernel, bias = logits.get_weights()
    logits.set_weights([kernel, bias + np.arange(10, dtype="float32")])
    try:
        source = export(model, staging, "v2-")
    finally:
        logits.set_weights([kernel, bias])
    want = tf.saved_model.load(str(source)).signatures["serving_default"](
        images=tf.constant(X))["class_names"].numpy()[0].decode()
    # When each load starts and ends: how long TensorFlow takes to load is this
    # machine's business; when the repository starts loading is the server's.
    loads = []

    def timed_load(path, version):
        started = time.monotonic()
        try:
            return load_servable(path, version)
        finally:
            loads.append((version, started, time.monotonic()))

    monkeypatch.setattr("stl10_keras.serving.repository.load_servable", timed_load)
    lines = []
    results = []  # (time, ok, class name)
    stop = threading.Event()

    def client(url):
        while not stop.is_set():
            status, body = call(f"{url}:predict", {"instances": X.tolist()})
            name = body["predictions"][0]["class_names"] if status == 200 else None
            results.append((time.monotonic(), status == 200, name))

    with serving(base, poll=0.2, settle=1.0, log=lines.append) as url:
        clients = [threading.Thread(target=client, args=(url,)) for _ in range(4)]
        for thread in clients:
            thread.start()
        try:
            time.sleep(0.5)
            _copy_in_two_halves(source, base / "2", pause=3.0)
            copied = time.monotonic()
            deadline = copied + 60
            while time.monotonic() < deadline and not any(
                    name == want for t, _, name in results if t > copied):
                time.sleep(0.1)
            time.sleep(0.5)
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=60)
    assert results and all(ok for _, ok, _ in results), [
        r for r in results if not r[1]][:3]
    served = min(t for t, _, name in results if name == want)
    # The complete copy's load starts after settling (1 s) and a poll (0.2 s),
    # with a second of slack; clients get it as soon as it has loaded.
    _, start, end = max(load for load in loads if load[0] == 2)  # the last one
    assert start - copied < 1.0 + 0.2 + 1.0, (
        f"loading began {start - copied:.1f} s after the copy")
    assert served - end < 1.0, f"served {served - end:.1f} s after it loaded"
    assert {name for _, _, name in results} <= {want} | {f"v1-{i}" for i in range(10)}
    print(f"version 2 served {served - copied:.2f} s after the copy ended (its "
          f"load began after {start - copied:.2f} s and took {end - start:.2f} s); "
          f"{len(results)} requests, log: {lines}")
    # Not tried while it was being written; tried at most once while the copy
    # stalled (a slow load may only reach the variables after the copy ends).
    failed = [ln for ln in lines if "version 2" in ln and "did not load" in ln]
    assert len(failed) <= 1, lines
    assert any("Serving model 'digits' version 2 (was 1)" in ln for ln in lines), lines


def test_a_failed_version_is_retried_when_a_file_under_it_changes(model, tmp_path):
    base, staging = tmp_path / NAME, tmp_path / "staging"
    export(model, base, "v1-")
    source = export(model, staging, "v2-")
    data = next((source / "variables").glob("variables.data-*"))
    shutil.copytree(source, base / "2")
    truncated = base / "2" / "variables" / data.name
    truncated.write_bytes(data.read_bytes()[:100])
    lines = []
    repository = ModelRepository(base, NAME, log=lines.append, settle_seconds=0.3)
    assert repository.start().version == 1  # 2 fails; 1 is served
    [state] = [s for s in repository.status()["model_version_status"]
               if s["version"] == "2"]
    assert state["state"] == "END" and state["status"]["error_message"]
    assert len(lines) == 1 and "version 2" in lines[0] and "did not load" in lines[0]
    # The same files: not tried again, however often it polls.
    assert repository.refresh() is False and repository.refresh() is False
    assert len(lines) == 1
    # A file two folders down completes: tried again once its files settle.
    truncated.write_bytes(data.read_bytes())
    assert repository.refresh() is False  # changed just now: not yet
    assert repository.current.version == 1
    time.sleep(0.4)
    assert repository.refresh() is True
    assert repository.current.version == 2
    assert repository.status()["model_version_status"][0] == {
        "version": "2", "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""}}


def test_a_new_version_is_loaded_only_once_its_files_settle(model, tmp_path):
    base = tmp_path / NAME
    export(model, base, "v1-")
    repository = ModelRepository(base, NAME, settle_seconds=1.0)
    repository.start()
    export(model, base, "v2-")
    assert repository.refresh() is False  # first seen now
    assert repository.refresh() is False  # unchanged, but not for 1 s yet
    (base / "2" / "assets.extra" / "note.txt").write_text("still copying")
    time.sleep(1.1)
    assert repository.refresh() is False  # a file changed: settling starts again
    time.sleep(1.1)
    assert repository.refresh() is True and repository.current.version == 2
