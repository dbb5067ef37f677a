"""The REST server over real HTTP on loopback, against the SavedModel's own signatures.

References are independent of the server: the exported signatures loaded with
`tf.saved_model.load`, images decoded by Pillow, and TF Serving's documented JSON.
"""

import base64
import http.client
import io
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import ROOT, rest_server, serve_cli, subprocess_env
from stl10_keras.config import preset
from stl10_keras.export import export_saved_model
from stl10_keras.model import build_model
from stl10_keras.serve import ModelRepository, ModelServer, NoVersionError

CLASSES = [f"class{i}" for i in range(10)]
NAME = "digits"
MAX_BODY = 2**20  # the module's server takes bodies up to 1 MB
# No proxy from the environment may sit between the tests and 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(url, body=None, method=None, raw=None, timeout=120):
    """One HTTP request; returns (status, parsed JSON body)."""
    data = raw if raw is not None else (None if body is None else
                                        json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def encode(image: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode("ascii")}


def as_lists(outputs: dict) -> dict:
    """Signature outputs as the JSON types TF Serving uses."""
    return {k: [s.decode() for s in v.numpy()] if v.dtype == tf.string
            else v.numpy().tolist() for k, v in outputs.items()}


def assert_rows_match(predictions, reference):
    """Row-format predictions (list of dicts) == the signature's batched outputs."""
    assert len(predictions) == len(reference["class_ids"])
    np.testing.assert_allclose([p["probabilities"] for p in predictions],
                               reference["probabilities"], rtol=1e-6, atol=1e-7)
    assert [p["class_ids"] for p in predictions] == reference["class_ids"]
    assert [p["class_names"] for p in predictions] == reference["class_names"]
    assert all(set(p) == {"probabilities", "class_ids", "class_names"}
               for p in predictions)


def sharp_model():
    """The smoke model with its logits scaled up, so classes are well separated."""
    keras.utils.set_random_seed(0)
    model = build_model(preset("smoke", "digits"), (32, 32, 3))
    logits = model.get_layer("logits")
    kernel, bias = logits.get_weights()
    logits.set_weights([kernel * 30.0, bias])
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = sharp_model()
    base = tmp_path_factory.mktemp("serve") / NAME
    export_saved_model(model, base, CLASSES)
    return model, base


@pytest.fixture(scope="module")
def reference(exported):
    _, base = exported
    return tf.saved_model.load(str(base / "1")).signatures


@contextmanager
def running_server(base, poll_seconds=None, max_body_bytes=MAX_BODY):
    repository = ModelRepository(base, NAME)
    repository.start()
    if poll_seconds:
        repository.start_polling(poll_seconds)
    with rest_server(repository, threads=8, max_body_bytes=max_body_bytes) as server:
        yield f"{server.url}/v1/models/{NAME}"


@pytest.fixture(scope="module")
def url(exported):
    _, base = exported
    with running_server(base) as url:
        yield url


def images(seed, n):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3)).astype("uint8")


# --- status and metadata --------------------------------------------------------------

def test_status_is_tf_servings_json(url):
    expected = {"model_version_status": [{
        "version": "1", "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""}}]}
    assert call(url) == (200, expected)
    assert call(f"{url}/versions/1") == (200, expected)


def test_metadata_lists_both_signatures_with_dtypes_and_shapes(url, reference):
    status, body = call(f"{url}/metadata")
    assert status == 200
    assert body["model_spec"] == {"name": NAME, "signature_name": "", "version": "1"}
    defs = body["metadata"]["signature_def"]["signature_def"]
    assert sorted(defs) == ["serving_bytes", "serving_default"]
    for name, fn in reference.items():
        sig = defs[name]
        assert sig["method_name"] == "tensorflow/serving/predict"
        for where, specs in (("inputs", fn.structured_input_signature[1]),
                             ("outputs", fn.structured_outputs)):
            assert sorted(sig[where]) == sorted(specs)
            for key, spec in specs.items():
                info = sig[where][key]
                assert info["dtype"] == "DT_" + {"float32": "FLOAT"}.get(
                    spec.dtype.name, spec.dtype.name.upper())
                dims = [int(d["size"]) for d in info["tensor_shape"]["dim"]]
                assert dims == [-1 if d is None else d for d in spec.shape]
    assert defs["serving_default"]["inputs"]["images"]["dtype"] == "DT_UINT8"
    assert defs["serving_bytes"]["inputs"]["image_bytes"]["dtype"] == "DT_STRING"


# --- predictions ----------------------------------------------------------------------

def test_uint8_instances_match_the_saved_models_signature(url, reference):
    x = images(1, 5)
    want = as_lists(reference["serving_default"](images=tf.constant(x)))
    status, body = call(f"{url}:predict", {"instances": x.tolist()})
    assert status == 200 and set(body) == {"predictions"}
    assert_rows_match(body["predictions"], want)
    # Named instances, the signature and version spelled out: the same answer.
    status, body = call(f"{url}/versions/1:predict", {
        "signature_name": "serving_default",
        "instances": [{"images": image.tolist()} for image in x]})
    assert status == 200
    assert_rows_match(body["predictions"], want)
    # An empty signature_name is the default signature, as in TF Serving.
    status, body = call(f"{url}:predict", {"signature_name": "",
                                           "instances": x.tolist()})
    assert status == 200
    assert_rows_match(body["predictions"], want)
    # Floats are refused for uint8, as TF Serving's json_tensor.cc does ("1.0" is
    # not an integer), even where they are whole numbers.
    status, body = call(f"{url}:predict", {"instances": x[:1].astype(float).tolist()})
    assert status == 400 and "without a decimal point" in body["error"]


def test_columnar_inputs_give_columnar_outputs(url, reference):
    x = images(2, 3)
    want = as_lists(reference["serving_default"](images=tf.constant(x)))
    for request in ({"inputs": x.tolist()}, {"inputs": {"images": x.tolist()}}):
        status, body = call(f"{url}:predict", request)
        assert status == 200 and set(body) == {"outputs"}
        out = body["outputs"]
        np.testing.assert_allclose(out["probabilities"], want["probabilities"],
                                   rtol=1e-6, atol=1e-7)
        assert out["class_ids"] == want["class_ids"]
        assert out["class_names"] == want["class_names"]


def test_b64_png_and_jpeg_match_the_signatures(url, reference):
    x = images(3, 2)
    png = encode(x[0], "PNG")  # lossless at the model's size: Pillow decodes it
    jpeg = encode(np.kron(x[1], np.ones((2, 2, 1), "uint8"))[:48, :40], "JPEG",
                  quality=90)  # another size: resized in the graph
    decoded = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    want_png = as_lists(reference["serving_default"](images=tf.constant(decoded[None])))
    want_both = as_lists(
        reference["serving_bytes"](image_bytes=tf.constant([png, jpeg])))
    for instances in ([b64(png), b64(jpeg)],
                      [{"image_bytes": b64(png)}, {"image_bytes": b64(jpeg)}]):
        status, body = call(f"{url}:predict", {"signature_name": "serving_bytes",
                                               "instances": instances})
        assert status == 200
        assert_rows_match(body["predictions"], want_both)
        assert_rows_match(body["predictions"][:1], want_png)
    status, body = call(f"{url}:predict", {"signature_name": "serving_bytes",
                                           "inputs": {"image_bytes": [b64(jpeg)]}})
    assert status == 200
    assert body["outputs"]["class_names"] == want_both["class_names"][1:]


# --- bad requests ---------------------------------------------------------------------

def _png_header_only():
    return encode(images(4, 1)[0], "PNG")[:120]  # a valid header, cut-off pixels


BAD_REQUESTS = [
    # (id, path suffix, method, body or raw bytes, status, words in the error)
    ("malformed JSON", ":predict", "POST", b'{"instances": [1', 400, "not valid JSON"),
    ("NaN", ":predict", "POST", b'{"instances": [NaN]}', 400, "NaN"),
    ("not an object", ":predict", "POST", [1, 2], 400, "JSON object"),
    ("missing keys", ":predict", "POST", {"signature_name": "serving_default"}, 400,
     "'instances'"),
    ("both formats", ":predict", "POST", {"instances": [], "inputs": []}, 400,
     "not both"),
    ("empty instances", ":predict", "POST", {"instances": []}, 400, "empty"),
    ("instances not a list", ":predict", "POST", {"instances": 3}, 400, "list"),
    ("wrong image size", ":predict", "POST",
     {"instances": np.zeros((1, 28, 28, 3), int).tolist()}, 400, "[32, 32, 3]"),
    ("ragged instances", ":predict", "POST",
     {"instances": [np.zeros((32, 32, 3), int).tolist(), [[1, 2]]]}, 400,
     "Instance 1"),
    ("above 255", ":predict", "POST",
     {"instances": np.full((1, 32, 32, 3), 300.5).tolist()}, 400, "0..255"),
    ("negative", ":predict", "POST",
     {"inputs": np.full((1, 32, 32, 3), -1).tolist()}, 400, "0..255"),
    ("beyond 64 bits", ":predict", "POST",
     {"instances": [[[[2**70, 0, 0]] * 32] * 32]}, 400,
     f"0..255 (uint8); found {2**70}"),
    ("fraction", ":predict", "POST",
     {"instances": np.full((1, 32, 32, 3), 12.5).tolist()}, 400, "12.5"),
    ("strings as pixels", ":predict", "POST",
     {"instances": np.full((1, 32, 32, 3), "a").tolist()}, 400, "numbers"),
    ("wrong input name", ":predict", "POST",
     {"instances": [{"pixels": np.zeros((32, 32, 3), int).tolist()}]}, 400, "images"),
    ("non-image bytes", ":predict", "POST",
     {"signature_name": "serving_bytes", "instances": [b64(b"hello, world")]}, 400,
     "not a JPEG, PNG"),
    ("truncated PNG", ":predict", "POST",
     {"signature_name": "serving_bytes", "instances": [b64(_png_header_only())]},
     400, "could not be decoded"),
    ("bad base64", ":predict", "POST",
     {"signature_name": "serving_bytes", "instances": [{"b64": "@@@"}]}, 400,
     "base64"),
    ("unknown signature", ":predict", "POST",
     {"signature_name": "nope", "instances": [[0]]}, 400, "signature_name"),
    ("unknown version", "/versions/7:predict", "POST", {"instances": [[0]]}, 404,
     "no version 7"),
    ("version not a number", "/versions/latest", "GET", None, 400, "not a number"),
    ("unknown version status", "/versions/7", "GET", None, 404, "no version 7"),
    # TF Serving: 400 "Malformed request" for a method or verb it has no route for.
    ("GET on predict", ":predict", "GET", None, 400, "Malformed request: GET"),
    ("unknown method", ":explain", "POST", {}, 400, "Malformed request: POST"),
    ("labels", "/labels/stable:predict", "POST", {}, 400,
     "Unrecognized servable version label: 'stable'"),
    ("oversized body", ":predict", "POST", b" " * (MAX_BODY + 100_000), 413,
     "--max-body-mb"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_a_bad_request_gets_its_status_and_one_sentence(url, case):
    _, suffix, method, body, status, words = case
    raw = body if isinstance(body, bytes) else None
    got, reply = call(f"{url}{suffix}", None if raw else body, method, raw=raw)
    assert got == status, reply
    assert set(reply) == {"error"} and words in reply["error"]
    assert reply["error"].endswith(".") and "\n" not in reply["error"]


def test_a_huge_content_length_is_refused_before_the_body_is_sent(url):
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.putrequest("POST", f"/v1/models/{NAME}:predict")
        connection.putheader("Content-Length", str(10**9))
        connection.endheaders()  # and no body: the answer comes from the headers
        response = connection.getresponse()
        assert response.status == 413
        assert "--max-body-mb" in json.loads(response.read())["error"]
    finally:
        connection.close()


def test_a_fractional_max_body_mb_is_named_as_given(exported):
    _, base = exported
    limit = int(0.1 * 2**20)  # --max-body-mb 0.1, as main() converts it
    with running_server(base, max_body_bytes=limit) as url:
        status, reply = call(f"{url}:predict", raw=b" " * (limit + 1000))
    assert status == 413
    assert "limit of 0.1 MB" in reply["error"], reply


def test_routes_are_case_insensitive_as_tf_servings_regexes(url, reference):
    root, rest = url.split("/v1/models/", 1)
    x = images(6, 1)
    want = as_lists(reference["serving_default"](images=tf.constant(x)))
    status, body = call(f"{root}/V1/Models/{rest}/VERSIONS/1/MetaData")
    assert status == 200 and body["model_spec"]["version"] == "1"
    status, body = call(f"{root}/v1/MODELS/{rest}:PREDICT", {"instances": x.tolist()})
    assert status == 200
    assert_rows_match(body["predictions"], want)


def test_get_models_without_a_name_is_tf_servings_400(url):
    root = url.split("/v1/models/", 1)[0]
    status, reply = call(f"{root}/v1/models")
    assert status == 400 and reply["error"].startswith("Missing model name")


def test_unpadded_base64_is_accepted_as_absl_does(url):
    data = encode(images(7, 1)[0], "PNG")
    text = base64.b64encode(data).decode()
    assert text.endswith("=")  # the PNG's length needs padding
    bodies = [{"signature_name": "serving_bytes", "instances": [{"b64": t}]}
              for t in (text, text.rstrip("="))]
    answers = [call(f"{url}:predict", body) for body in bodies]
    assert answers[0][0] == 200 and answers[0] == answers[1]


def test_metadata_prints_empty_defaults_as_tf_serving(url):
    defs = call(f"{url}/metadata")[1]["metadata"]["signature_def"]["signature_def"]
    assert all(sig["defaults"] == {} for sig in defs.values())


@pytest.mark.parametrize("version", ["\u00b2", "\u0661", "9" * 5000, "1" * 20])
def test_a_version_that_is_not_an_int64_is_a_400_not_a_500(url, version):
    quoted = urllib.request.quote(version)
    for suffix, body in (("", None), ("/metadata", None),
                         (":predict", {"instances": images(8, 1).tolist()})):
        status, reply = call(f"{url}/versions/{quoted}{suffix}", body)
        assert status == 400, reply
        assert "\n" not in reply["error"] and len(reply["error"]) < 200


def test_cors_headers_only_with_enable_cors(exported):
    _, base = exported
    repository = ModelRepository(base, NAME)
    repository.start()
    for enable in (False, True):
        with ModelServer(repository, "127.0.0.1", 0, threads=2,
                         enable_cors=enable) as server:
            for method, path in (("GET", f"/v1/models/{NAME}"),
                                 ("GET", "/v1/models/other"),
                                 ("OPTIONS", f"/v1/models/{NAME}:predict")):
                connection = http.client.HTTPConnection(server.host, server.port,
                                                        timeout=60)
                connection.request(method, path)
                response = connection.getresponse()
                response.read()
                connection.close()
                origin = response.getheader("Access-Control-Allow-Origin")
                assert origin == ("*" if enable else None), (method, path)
                if method == "OPTIONS":  # a preflight: 200 only with CORS
                    assert response.status == (200 if enable else 400)
                    if enable:
                        assert response.getheader(
                            "Access-Control-Allow-Methods") == "POST, GET"


def test_unknown_model_and_path_are_404_and_the_server_keeps_serving(url):
    root = url.rsplit("/v1/", 1)[0]
    status, reply = call(f"{root}/v1/models/other:predict", {"instances": [[0]]})
    assert status == 404 and "'other'" in reply["error"]
    status, reply = call(f"{root}/favicon.ico")
    assert status == 404 and set(reply) == {"error"}
    # After every bad request above, good ones still work.
    status, body = call(f"{url}:predict", {"instances": images(5, 1).tolist()})
    assert status == 200 and len(body["predictions"]) == 1
    assert call(url)[0] == 200


# --- concurrency ----------------------------------------------------------------------

def test_sixteen_concurrent_clients_all_get_correct_answers(url, reference):
    batches = [images(10 + i, 1 + (i % 3) * 4) for i in range(4)]
    pngs = [encode(b[0], "PNG") for b in batches]
    want = [as_lists(reference["serving_default"](images=tf.constant(b)))
            for b in batches]

    def client(i):
        k = i % len(batches)
        if i % 2:
            status, body = call(f"{url}:predict", {"instances": batches[k].tolist()})
            return status, body, want[k]
        status, body = call(f"{url}:predict", {"signature_name": "serving_bytes",
                                               "instances": [b64(pngs[k])]})
        return status, body, {key: v[:1] for key, v in want[k].items()}

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client, range(48)))
    for status, body, expected in results:
        assert status == 200, body
        assert_rows_match(body["predictions"], expected)


# --- versions -------------------------------------------------------------------------

def test_a_new_version_is_served_without_a_restart(exported, tmp_path):
    model, base = exported
    pushed = tmp_path / NAME
    shutil.copytree(base / "1", pushed / "1")
    x = images(20, 2)
    with running_server(pushed, poll_seconds=0.2) as url:
        status, body = call(f"{url}:predict", {"instances": x.tolist()})
        assert status == 200
        assert body["predictions"][0]["class_names"].startswith("class")
        # Version 2: other class names and another bias, so its outputs differ.
        logits = model.get_layer("logits")
        kernel, bias = logits.get_weights()
        try:
            logits.set_weights([kernel, bias + np.arange(10, dtype="float32")])
            export_saved_model(model, pushed, [f"v2-{c}" for c in CLASSES])
        finally:
            logits.set_weights([kernel, bias])
        want = as_lists(tf.saved_model.load(str(pushed / "2"))
                        .signatures["serving_default"](images=tf.constant(x)))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            states = {s["version"]: s["state"]
                      for s in call(url)[1]["model_version_status"]}
            if states.get("2") == "AVAILABLE":
                break
            time.sleep(0.2)
        assert states == {"2": "AVAILABLE", "1": "END"}
        status, body = call(f"{url}:predict", {"instances": x.tolist()})
        assert status == 200
        assert_rows_match(body["predictions"], want)
        assert all(p["class_names"].startswith("v2-") for p in body["predictions"])
        assert call(f"{url}/versions/2:predict", {"instances": x.tolist()})[0] == 200
        status, reply = call(f"{url}/versions/1:predict", {"instances": x.tolist()})
        assert status == 404 and "not loaded" in reply["error"]
        assert call(f"{url}/metadata")[1]["model_spec"]["version"] == "2"


def test_a_version_that_does_not_load_is_refused(tmp_path):
    (tmp_path / "m" / "3").mkdir(parents=True)
    (tmp_path / "m" / "3" / "saved_model.pb").write_bytes(b"not a SavedModel")
    with pytest.raises(NoVersionError, match="No version under .* could be loaded "
                                             r"\(version 3: "):
        ModelRepository(tmp_path / "m").start()


# --- the command line -----------------------------------------------------------------

def _serve_cli(*args):
    # No gRPC API unless a test asks for one: port 8500 may be taken here.
    grpc = () if "--grpc-port" in args else ("--grpc-port", "0")
    return [sys.executable, "-m", "stl10_keras.serve", *args, *grpc]


@pytest.mark.parametrize(
    "layout", ["empty", "missing", "versions without a model", "a file"])
def test_cli_refuses_to_start_without_a_valid_version(tmp_path, layout):
    base = tmp_path / "m"
    if layout == "a file":
        base.write_text("not a model folder")
    elif layout != "missing":
        base.mkdir()
    if layout == "versions without a model":
        (base / "1").mkdir()  # no saved_model.pb
    proc = subprocess.run(_serve_cli("--model-base-path", str(base), "--port", "0"),
                          cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert str(base) in lines[0] and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    if layout == "a file":
        assert "is a file" in lines[0] and "does not exist" not in lines[0]


@pytest.mark.parametrize("flag, value", [
    ("--poll-seconds", "1e308"), ("--poll-seconds", "inf"), ("--poll-seconds", "nan"),
    ("--threads", "100000"), ("--max-body-mb", "1e300"), ("--max-body-mb", "0"),
    ("--grpc-port", "65536"), ("--grpc-port", "-1"), ("--settle-seconds", "0"),
    ("--version-labels", "stable"), ("--version-labels", "stable=x"),
    ("--version-labels", "a/b=1"), ("--version-labels", "s=1,s=2"),
    ("--version-labels", "s=99999999999999999999"),
])
def test_cli_refuses_numbers_out_of_range_as_a_usage_error(flag, value):
    # In process: argparse exits 2 with one usage sentence before anything loads
    # (1e308 poll seconds used to end in threading's OverflowError at start-up).
    from stl10_keras import serve
    with pytest.raises(SystemExit) as exit_info:
        serve.build_parser().parse_args(["--model-base-path", "m", flag, value])
    assert exit_info.value.code == 2
    args = serve.build_parser().parse_args(
        ["--model-base-path", "m", "--poll-seconds", "86400", "--threads", "1024"])
    assert args.poll_seconds == 86400 and args.threads == 1024
    args = serve.build_parser().parse_args(
        ["--model-base-path", "m", "--version-labels", "stable=2, canary=3"])
    assert args.version_labels == {"stable": 2, "canary": 3}
    assert args.grpc_port == 8500 and args.port == 8501 and not args.enable_cors


def test_cli_refuses_a_host_that_does_not_resolve_without_a_traceback(exported):
    _, base = exported
    proc = subprocess.run(
        _serve_cli("--model-base-path", str(base), "--host", "no-such-host.invalid",
                   "--port", "0"),
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "--host" in last and "no-such-host.invalid" in last and "127.0.0.1" in last


@pytest.mark.parametrize("name", ["a/b", "v1:predict"])
def test_cli_refuses_a_model_name_no_url_can_address(exported, name):
    _, base = exported
    proc = subprocess.run(
        _serve_cli("--model-base-path", str(base), "--model-name", name, "--port", "0"),
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert name in lines[0] and "--model-name" in lines[0]
    assert proc.stdout == ""


@pytest.mark.e2e
def test_cli_reports_a_port_in_use_in_one_line(exported):
    import socket

    _, base = exported
    with socket.socket() as taken:  # an independent listener holds the port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            _serve_cli("--model-base-path", str(base), "--port", str(port)),
            cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
            timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0]
    assert "--port" in errors[0] and proc.stdout == ""


@pytest.mark.e2e
def test_cli_serves_and_stops_cleanly_on_ctrl_c(exported):
    _, base = exported
    with serve_cli("--model-base-path", str(base), "--model-name", NAME,
                   "--port", "0", "--grpc-port", "0") as line:
        assert line.startswith(f"Serving model '{NAME}' version 1"), line
        url = line.split(" at ", 1)[1].split(";", 1)[0]
        assert url.startswith("http://127.0.0.1:")
        assert call(url)[0] == 200
        status, body = call(f"{url}:predict", {"instances": images(30, 1).tolist()})
        assert status == 200 and len(body["predictions"]) == 1


# --- benchmarks/serve.py --------------------------------------------------------------

@pytest.mark.parametrize("flags, code, needle", [
    (["--batches", "1,x"], 2, "--batches takes integers"),
    (["--seconds", "nan"], 2, "--seconds"),
    (["--threads", "0"], 2, "--threads"),
    (["--clients", "1,0"], 2, "--clients"),
    (["--front-ends", "REST,soap"], 2, "--front-ends"),
    (["--batching", "off,maybe"], 2, "--batching takes off and/or on"),
    # The server's own sentence, not "the server did not start ('')".
    (["--model-base-path", "{tmp}/missing"], 1, "{tmp}/missing does not exist"),
])
def test_serve_benchmark_bad_flags_get_one_sentence(tmp_path, flags, code, needle):
    flags = [f.format(tmp=tmp_path) for f in flags]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve.py"), *flags],
        cwd=ROOT, env=subprocess_env(), capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert needle.format(tmp=tmp_path) in last


@pytest.mark.e2e
def test_serve_benchmark_measures_both_front_ends_and_the_signature():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--preset", "smoke",
         "--seconds", "0.3", "--batches", "2", "--clients", "1"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| front end")]
    assert sorted(r[0].strip() for r in rows) == ["REST", "gRPC", "in-process"]
    for row in rows:
        assert row[2].strip() == "2" and row[-1].strip() == "0", row


@pytest.mark.e2e
def test_serve_benchmark_compares_batching_off_and_on_beside_the_bound():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--preset", "smoke",
         "--seconds", "0.3", "--batches", "1", "--clients", "4",
         "--batching", "off,on", "--front-ends", "REST,gRPC"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]]
            for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| front end")]
    assert sorted((r[0], r[4]) for r in rows) == [
        ("REST", "off"), ("REST", "on"), ("gRPC", "off"), ("gRPC", "on")]
    bound = float(re.search(r"Upper bound: .* ([\d.]+) images/s", proc.stdout)[1])
    for row in rows:
        assert row[-1] == "0", row
        assert float(row[8]) == pytest.approx(float(row[7]) / bound, abs=0.006)


def test_serving_a_run_folder_names_its_models_base_path(exported, tmp_path):
    # It said to export a model first, while the model was in the run's base path.
    _, base = exported
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"export_path": str(base / "1")}))
    with pytest.raises(NoVersionError) as info:
        ModelRepository(run, NAME).start()
    assert str(info.value) == (
        f"{run} is a training run, not a model base path; its model was exported "
        f"to {base}: pass --model-base-path {base}.")
    with pytest.raises(NoVersionError) as info:
        ModelRepository(base / "1", NAME).start()
    assert str(info.value) == (
        f"{base / '1'} is one version of an exported model, not its base path; pass "
        f"--model-base-path {base}, the folder that holds the versions.")
