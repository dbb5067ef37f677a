"""No 500 for a client: a corpus of bad requests against both front ends.

Each bad request must get a 4xx (REST) or one of TF Serving's client codes
(gRPC) with one sentence, no traceback on the server's stderr, and the valid
predictions afterwards must equal those before (and the SavedModel's own).
"""

import base64
import http.client
import io
import json
import struct
import zlib

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import prediction_service_pb2_grpc

from conftest import rest_server
from stl10_keras.config import preset
from stl10_keras.export import export_saved_model
from stl10_keras.model import build_model
from stl10_keras.serving.grpc import GrpcServer
from stl10_keras.serving.repository import ModelRepository
from test_serving_grpc import GRPC_ERRORS, grpc_error, predict_request

NAME = "digits"
MAX_BYTES = 2**20
M = f"/v1/models/{NAME}"
PIXELS = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)


def b64(data: bytes, pad: bool = True) -> dict:
    text = base64.b64encode(data).decode()
    return {"b64": text if pad else text.rstrip("=")}


def encoded(image, fmt) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt)
    return buffer.getvalue()


def png_header(width, height) -> bytes:
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data +
                struct.pack(">I", zlib.crc32(kind + data)))
    return (b"\x89PNG\r\n\x1a\n" +
            chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def js(value) -> bytes:
    return json.dumps(value).encode()


def rows(value) -> bytes:
    return js({"instances": value})


def bytes_rows(*items) -> bytes:
    return js({"signature_name": "serving_bytes", "instances": list(items)})


IMAGE = PIXELS[0].tolist()
PNG = encoded(PIXELS[0], "PNG")

# (method, path, body): every one a client's mistake.
REST_CORPUS = [
    # paths
    ("GET", "/", None), ("GET", "/v1", None), ("GET", "/v1/", None),
    ("GET", "/v1/models", None), ("GET", "/v1/models/", None),
    ("GET", "/v1/models/other", None), ("GET", f"{M}/", None),
    ("GET", f"/v1/models//{NAME}", None), ("GET", f"{M}/versions", None),
    ("GET", f"{M}/versions/", None), ("GET", f"{M}/metadata/x", None),
    ("GET", f"{M}/labels/", None), ("GET", f"{M}/labels/stable/metadata", None),
    ("GET", "/v1/MODELS/DIGITS", None), ("GET", "/favicon.ico", None),
    ("GET", f"{M}/" + "a" * 200_000, None),
    ("POST", "/v1/models/other:predict", rows([IMAGE])),
    ("POST", f"{M}/versions/1/labels/x:predict", rows([IMAGE])),
    ("GET", "/v1/models/%2F%3A", None),
    # versions
    ("GET", f"{M}/versions/%C2%B2", None), ("GET", f"{M}/versions/%D9%A1", None),
    ("POST", f"{M}/versions/%D9%A1:predict", rows([IMAGE])),
    ("GET", f"{M}/versions/-1", None), ("GET", f"{M}/versions/1.0", None),
    ("GET", f"{M}/versions/0x1", None), ("GET", f"{M}/versions/1e3", None),
    ("GET", f"{M}/versions/%20", None), ("GET", f"{M}/versions/0", None),
    ("GET", f"{M}/versions/9223372036854775808", None),
    ("GET", f"{M}/versions/9223372036854775807", None),
    ("GET", f"{M}/versions/" + "9" * 5000, None),
    ("GET", f"{M}/versions/" + "9" * 5000 + "/metadata", None),
    ("POST", f"{M}/versions/" + "1" * 200_000 + ":predict", rows([IMAGE])),
    ("POST", f"{M}/versions/7:predict", rows([IMAGE])),
    ("GET", f"{M}/versions/7/metadata", None),
    ("GET", f"{M}/labels/stable/metadata", None),
    ("POST", f"{M}/labels/canary:predict", rows([IMAGE])),
    # methods and verbs
    ("PUT", f"{M}:predict", rows([IMAGE])), ("DELETE", M, None), ("PATCH", M, b"{}"),
    ("HEAD", M, None), ("OPTIONS", f"{M}:predict", None), ("GET", f"{M}:predict", None),
    ("POST", M, b"{}"), ("POST", f"{M}/metadata", b"{}"),
    ("POST", f"{M}:classify", b"{}"), ("POST", f"{M}:regress", b"{}"),
    ("POST", f"{M}:explain", b"{}"), ("POST", f"{M}:", b"{}"),
    ("POST", f"{M}:predict:predict", b"{}"),
    # bodies and JSON
    ("POST", f"{M}:predict", b""), ("POST", f"{M}:predict", b"null"),
    ("POST", f"{M}:predict", b"[]"), ("POST", f"{M}:predict", b'"x"'),
    ("POST", f"{M}:predict", b"1"), ("POST", f"{M}:predict", b"{}"),
    ("POST", f"{M}:predict", b'{"instances": [1'),
    ("POST", f"{M}:predict", b'{"instances": [[1]]} trailing'),
    ("POST", f"{M}:predict", b"\xff\xfe{}"), ("POST", f"{M}:predict", b"[" * 100_000),
    ("POST", f"{M}:predict", b'{"instances": [NaN]}'),
    ("POST", f"{M}:predict", b'{"instances": [-Infinity]}'),
    ("POST", f"{M}:predict", rows([IMAGE]).replace(b"[[[[", b"[[[[1e400, ", 1)
     .replace(b"1e400, " + str(IMAGE[0][0][0]).encode() + b", ", b"1e400, ", 1)),
    ("POST", f"{M}:predict", rows([IMAGE]).replace(b"[[[[", b"[[[[" + b"7" * 5000, 1)),
    ("POST", f"{M}:predict", '{"signature_name": "serving_bytes", "instances": '
     '["\udcff"]}'.encode("utf-8", "surrogatepass")),
    ("POST", f"{M}:predict", b'{"signature_name": "serving_bytes", "instances": '
     b'["\\udcff"]}'),
    ("GET", "/v1/models/%FF", None), ("GET", f"{M}/versions/%00", None),
    ("POST", f"{M}:predict", js({"instances": [], "inputs": []})),
    ("POST", f"{M}:predict", js({"instances": None})),
    ("POST", f"{M}:predict", js({"instances": {}})),
    ("POST", f"{M}:predict", js({"inputs": None})),
    ("POST", f"{M}:predict", js({"signature_name": 5, "instances": [IMAGE]})),
    ("POST", f"{M}:predict", js({"signature_name": [], "instances": [IMAGE]})),
    ("POST", f"{M}:predict", js({"signature_name": "nope", "instances": [IMAGE]})),
    # tensors
    ("POST", f"{M}:predict", rows([])), ("POST", f"{M}:predict", rows(3)),
    ("POST", f"{M}:predict", rows([IMAGE, [[1, 2]]])),
    ("POST", f"{M}:predict", rows([np.zeros((28, 28, 3), int).tolist()])),
    ("POST", f"{M}:predict", rows([[IMAGE]])),
    ("POST", f"{M}:predict", rows(IMAGE)),
    ("POST", f"{M}:predict", rows([np.full((32, 32, 3), "a").tolist()])),
    ("POST", f"{M}:predict", rows([np.full((32, 32, 3), True).tolist()])),
    ("POST", f"{M}:predict", rows([[[[True, 1, 2]] + IMAGE[0][1:]] + IMAGE[1:]])),
    ("POST", f"{M}:predict", rows([np.ones((32, 32, 3)).tolist()])),
    ("POST", f"{M}:predict", rows([np.full((32, 32, 3), 12.5).tolist()])),
    ("POST", f"{M}:predict", rows([np.full((32, 32, 3), -1).tolist()])),
    ("POST", f"{M}:predict", rows([np.full((32, 32, 3), 256).tolist()])),
    ("POST", f"{M}:predict", rows([[[[2**70, 0, 0]] * 32] * 32])),
    ("POST", f"{M}:predict", rows([{"pixels": IMAGE}])),
    ("POST", f"{M}:predict", rows([{"images": IMAGE, "extra": 1}])),
    ("POST", f"{M}:predict", js({"inputs": {"pixels": [IMAGE]}})),
    ("POST", f"{M}:predict", js({"inputs": [[IMAGE]]})),
    ("POST", f"{M}:predict", rows([b64(PNG)])),
    # base64 and images
    ("POST", f"{M}:predict", bytes_rows({"b64": "@@@"})),
    ("POST", f"{M}:predict", bytes_rows({"b64": "abcde"})),
    ("POST", f"{M}:predict", bytes_rows({"b64": 5})),
    ("POST", f"{M}:predict", bytes_rows({"b64": b64(PNG)["b64"], "x": 1})),
    ("POST", f"{M}:predict", bytes_rows(5)),
    ("POST", f"{M}:predict", bytes_rows(b64(b"hello"))),
    ("POST", f"{M}:predict", bytes_rows(b64(b""))),
    ("POST", f"{M}:predict", bytes_rows(b64(PNG[:120]))),
    ("POST", f"{M}:predict", bytes_rows(b64(PNG[:40] + b"\0" * 200))),
    ("POST", f"{M}:predict", bytes_rows(b64(png_header(20000, 20000)))),
    ("POST", f"{M}:predict", bytes_rows(b64(png_header(12000, 12000)))),
    ("POST", f"{M}:predict", bytes_rows(b64(encoded(PIXELS[0], "TIFF")))),
    ("POST", f"{M}:predict", bytes_rows(b64(PNG), b64(b"GIF89a"))),
    ("POST", f"{M}:predict", js({"signature_name": "serving_bytes",
                                 "inputs": {"image_bytes": b64(PNG)}})),
    # sizes
    ("POST", f"{M}:predict", b" " * (MAX_BYTES + 1000)),
    ("POST", f"{M}:predict", rows([IMAGE] * 200)),
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = build_model(preset("smoke", "digits"), (32, 32, 3))
    base = tmp_path_factory.mktemp("corpus") / NAME
    export_saved_model(model, base, [f"class{i}" for i in range(10)])
    repository = ModelRepository(base, NAME)
    repository.start()
    reference = tf.saved_model.load(str(base / "1")).signatures["serving_default"]
    want = reference(images=tf.constant(PIXELS))["probabilities"].numpy()
    with rest_server(repository, threads=4, max_body_bytes=MAX_BYTES) as rest, \
            GrpcServer(repository, "127.0.0.1", 0, threads=4,
                       max_message_bytes=MAX_BYTES) as server:
        channel = grpc.insecure_channel(server.address)
        yield rest, prediction_service_pb2_grpc.PredictionServiceStub(channel), want
        channel.close()


def rest_call(rest, method, path, body):
    connection = http.client.HTTPConnection(rest.host, rest.port, timeout=120)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        connection.putheader("Content-Length", str(len(body or b"")))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def rest_probabilities(rest):
    status, data = rest_call(rest, "POST", f"{M}:predict", rows(PIXELS.tolist()))
    assert status == 200, data
    return np.float32([p["probabilities"] for p in json.loads(data)["predictions"]])


def test_the_corpus_is_large_enough():
    assert len(REST_CORPUS) + len(GRPC_ERRORS) >= 80
    assert len(REST_CORPUS) >= 80


def test_every_bad_rest_request_gets_a_4xx_with_one_sentence(servers, capfd):
    rest, _, want = servers
    np.testing.assert_array_equal(rest_probabilities(rest), want)
    wrong = []
    for method, path, body in REST_CORPUS:
        status, data = rest_call(rest, method, path, body)
        try:
            error = json.loads(data)["error"] if method != "HEAD" else "-."
        except (ValueError, KeyError, TypeError):
            error = None
        ok = (400 <= status < 500 and isinstance(error, str) and
              error.endswith(".") and "\n" not in error and len(error) < 600)
        if not ok:
            wrong.append((method, path[:60], status, data[:200]))
    assert not wrong, wrong
    np.testing.assert_array_equal(rest_probabilities(rest), want)
    assert "Traceback" not in capfd.readouterr().err


def test_every_bad_grpc_call_gets_a_client_code_with_one_sentence(servers, capfd):
    _, stub, want = servers
    codes = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
             grpc.StatusCode.RESOURCE_EXHAUSTED}
    wrong = []
    for case_id, service, method, request, _, _ in GRPC_ERRORS:
        if service != 0:  # ModelService: covered in test_serving_grpc.py
            continue
        got = grpc_error(stub, method, request)
        if got is None or got[0] not in codes or "\n" in got[1]:
            wrong.append((case_id, got))
    assert not wrong, wrong
    response = stub.Predict(predict_request(images=PIXELS), timeout=60)
    np.testing.assert_array_equal(
        tf.make_ndarray(response.outputs["probabilities"]), want)
    assert "Traceback" not in capfd.readouterr().err
