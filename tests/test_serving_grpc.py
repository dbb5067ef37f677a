"""TF Serving's gRPC API, called with `tensorflow-serving-api`'s own stubs.

References are independent of the server: the Keras model called in process,
the SavedModel's signatures loaded with `tf.saved_model.load`, PNGs written by
Pillow, and the REST API of the same repository over real HTTP.
"""

import io
import json
import socket
import subprocess
import sys
import urllib.request
from contextlib import contextmanager

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from conftest import (ROOT, export_sharp_model, predict_request, rest_server,
                      serve_cli, subprocess_env)
from stl10_keras.config import preset
from stl10_keras.export import export_saved_model
from stl10_keras.model import build_model
from stl10_keras.serving.grpc import GrpcServer
from stl10_keras.serving.repository import ModelRepository

NAME = "digits"
MAX_BYTES = 2**20
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def rest_predict(url, body):
    request = urllib.request.Request(f"{url}:predict", json.dumps(body).encode())
    with _OPENER.open(request, timeout=120) as response:
        return json.loads(response.read())


def images(seed, n, size=32):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3),
                                                dtype=np.uint8)


def png(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, base = export_sharp_model(tmp_path_factory.mktemp("grpc"), NAME)
    return model, base


@contextmanager
def both_servers(base, labels=None):
    repository = ModelRepository(base, NAME, labels=labels)
    repository.start()
    with rest_server(repository, threads=4, max_body_bytes=MAX_BYTES) as rest, \
            GrpcServer(repository, "127.0.0.1", 0, threads=4,
                       max_message_bytes=MAX_BYTES) as server:
        channel = grpc.insecure_channel(server.address)
        try:
            yield (prediction_service_pb2_grpc.PredictionServiceStub(channel),
                   model_service_pb2_grpc.ModelServiceStub(channel),
                   f"{rest.url}/v1/models/{NAME}")
        finally:
            channel.close()


@pytest.fixture(scope="module")
def servers(exported):
    with both_servers(exported[1]) as stubs:
        yield stubs




def outputs(response):
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


# --- Predict ----------------------------------------------------------------------

def test_predict_equals_rest_and_the_keras_model(exported, servers):
    model, _ = exported
    prediction, _, url = servers
    x = images(1, 5)
    response = prediction.Predict(predict_request(images=x), timeout=60)
    got = outputs(response)
    assert response.model_spec.name == NAME
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    assert sorted(got) == ["class_ids", "class_names", "probabilities"]
    assert got["probabilities"].dtype == np.float32
    # REST, same repository: the same float32 numbers, digit for digit.
    rest = rest_predict(url, {"instances": x.tolist()})["predictions"]
    np.testing.assert_array_equal(
        got["probabilities"],
        np.array([p["probabilities"] for p in rest], np.float32))
    assert [p["class_names"] for p in rest] == [s.decode() for s in
                                                got["class_names"]]
    # The Keras model in this process.
    want = keras.ops.convert_to_numpy(
        keras.ops.softmax(model(x.astype("float32"), training=False)))
    np.testing.assert_allclose(got["probabilities"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["class_ids"], want.argmax(-1))


def test_predict_bytes_signature_and_output_filter(exported, servers):
    _, base = exported
    prediction, _, url = servers
    x = images(2, 2)
    encoded = np.array([png(image) for image in x], dtype=object)
    request = predict_request("serving_bytes", image_bytes=encoded)
    request.output_filter.append("class_ids")
    response = prediction.Predict(request, timeout=60)
    assert sorted(response.outputs) == ["class_ids"]
    reference = tf.saved_model.load(str(base / "1")).signatures["serving_default"]
    want = reference(images=tf.constant(x))  # a PNG is lossless
    np.testing.assert_array_equal(outputs(response)["class_ids"],
                                  want["class_ids"].numpy())
    # Version and label spelled out: the same version answers.
    request.model_spec.version.value = 1
    assert prediction.Predict(request, timeout=60).model_spec.version.value == 1


# --- metadata and status ------------------------------------------------------------

def test_metadata_holds_the_saved_models_signatures(exported, servers):
    _, base = exported
    prediction, _, _ = servers
    request = get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec={"name": NAME}, metadata_field=["signature_def"])
    response = prediction.GetModelMetadata(request, timeout=60)
    assert response.model_spec.name == NAME and response.model_spec.version.value == 1
    defs = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(defs)
    reference = tf.saved_model.load(str(base / "1")).signatures
    assert sorted(defs.signature_def) == sorted(reference)
    for name, fn in reference.items():
        sig = defs.signature_def[name]
        assert sig.method_name == "tensorflow/serving/predict"
        for key, spec in fn.structured_input_signature[1].items():
            info = sig.inputs[key]
            assert info.dtype == spec.dtype.as_datatype_enum
            assert [d.size for d in info.tensor_shape.dim] == [
                -1 if d is None else d for d in spec.shape]
        assert sorted(sig.outputs) == sorted(fn.structured_outputs)


def test_model_status_reports_the_loaded_version(servers):
    _, model_service, _ = servers
    request = get_model_status_pb2.GetModelStatusRequest(model_spec={"name": NAME})
    response = model_service.GetModelStatus(request, timeout=60)
    [status] = response.model_version_status
    assert status.version == 1
    assert status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert status.status.error_code == 0 and status.status.error_message == ""
    request.model_spec.version.value = 1
    assert model_service.GetModelStatus(request, timeout=60) == response


# --- errors -------------------------------------------------------------------------

def _bomb_png(side):
    """A PNG header claiming side x side pixels (no pixel data)."""
    import struct
    import zlib

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data +
                struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) +
            chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _status_request(**spec):
    return get_model_status_pb2.GetModelStatusRequest(model_spec=spec)


def _with(request, **spec):
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    return request


GOOD = images(3, 1)
INVALID, NOT_FOUND, EXHAUSTED = (grpc.StatusCode.INVALID_ARGUMENT,
                                 grpc.StatusCode.NOT_FOUND,
                                 grpc.StatusCode.RESOURCE_EXHAUSTED)

#: (id, service, method, request, code, words in the details)
GRPC_ERRORS = [
    ("unknown model", 0, "Predict", predict_request(name="other", images=GOOD),
     NOT_FOUND, "'other'"),
    ("unknown version", 0, "Predict", _with(predict_request(images=GOOD), version=7),
     NOT_FOUND, "no version 7"),
    ("unknown label", 0, "Predict",
     _with(predict_request(images=GOOD), version_label="stable"), INVALID,
     "Unrecognized servable version label"),
    ("unknown signature", 0, "Predict", predict_request("nope", images=GOOD),
     INVALID, "signature_name"),
    ("float pixels", 0, "Predict", predict_request(images=GOOD.astype("float32")),
     INVALID, "must be uint8"),
    ("wrong image size", 0, "Predict", predict_request(images=images(4, 1, 28)),
     INVALID, "[N, 32, 32, 3]"),
    ("no batch axis", 0, "Predict", predict_request(images=GOOD[0]), INVALID,
     "[N, 32, 32, 3]"),
    ("wrong input name", 0, "Predict", predict_request(pixels=GOOD), INVALID,
     "takes ['images']"),
    ("no input", 0, "Predict", predict_request(), INVALID, "takes ['images']"),
    ("not an image", 0, "Predict",
     predict_request("serving_bytes", image_bytes=np.array([b"hello"], object)),
     INVALID, "not a JPEG, PNG"),
    ("decompression bomb", 0, "Predict",
     predict_request("serving_bytes", image_bytes=np.array([_bomb_png(20000)],
                                                           object)),
     INVALID, "more than the 33,554,432"),
    ("truncated PNG", 0, "Predict",
     predict_request("serving_bytes",
                     image_bytes=np.array([png(images(5, 1)[0])[:120]], object)),
     INVALID, "could not be decoded"),
    ("bytes as pixels", 0, "Predict",
     predict_request(images=np.array([b"x"], object)), INVALID, "must be uint8"),
    ("unknown output", 0, "Predict",
     predict_request(images=GOOD).__class__(
         model_spec={"name": NAME}, output_filter=["logits"],
         inputs={"images": tf.make_tensor_proto(GOOD)}),
     INVALID, "output_filter"),
    ("message over the limit", 0, "Predict",
     predict_request(images=images(6, 400)), EXHAUSTED, ""),
    ("a huge claimed shape", 0, "Predict",
     predict_request(images=np.zeros((0, 32, 32, 3), np.uint8)).__class__(
         model_spec={"name": NAME}, inputs={"images": {
             "dtype": tf.uint8.as_datatype_enum,
             "tensor_shape": {"dim": [{"size": 10**9}, {"size": 32}, {"size": 32},
                                      {"size": 3}]},
             "int_val": [1]}}),
     EXHAUSTED, "larger than this server's limit"),
    ("empty batch", 0, "Predict",
     predict_request(images=np.zeros((0, 32, 32, 3), np.uint8)), INVALID,
     "no example"),
    ("classify", 0, "Classify",
     classification_pb2.ClassificationRequest(model_spec={"name": NAME}), INVALID,
     "tensorflow/serving/classify"),
    ("regress", 0, "Regress",
     regression_pb2.RegressionRequest(model_spec={"name": NAME}), INVALID,
     "tensorflow/serving/regress"),
    ("classify unknown model", 0, "Classify",
     classification_pb2.ClassificationRequest(model_spec={"name": "other"}),
     NOT_FOUND, "'other'"),
    ("metadata without a field", 0, "GetModelMetadata",
     get_model_metadata_pb2.GetModelMetadataRequest(model_spec={"name": NAME}),
     INVALID, "metadata_field"),
    ("metadata of another field", 0, "GetModelMetadata",
     get_model_metadata_pb2.GetModelMetadataRequest(
         model_spec={"name": NAME}, metadata_field=["graph"]), INVALID,
     "not supported"),
    ("metadata of an unknown version", 0, "GetModelMetadata",
     get_model_metadata_pb2.GetModelMetadataRequest(
         model_spec={"name": NAME, "version": {"value": 9}},
         metadata_field=["signature_def"]), NOT_FOUND, "no version 9"),
    ("status without a spec", 1, "GetModelStatus",
     get_model_status_pb2.GetModelStatusRequest(), INVALID, "Missing ModelSpec"),
    ("status of another model", 1, "GetModelStatus", _status_request(name="x"),
     NOT_FOUND, "Could not find any versions"),
    ("status of an unknown version", 1, "GetModelStatus",
     _status_request(name=NAME, version={"value": 2**63 - 1}), NOT_FOUND,
     "no version"),
]


def grpc_error(stub, method, request):
    """The (code, details) a call ends in; None if it succeeded."""
    try:
        getattr(stub, method)(request, timeout=60)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return None


@pytest.mark.parametrize("case", GRPC_ERRORS, ids=[c[0] for c in GRPC_ERRORS])
def test_a_bad_call_gets_tf_servings_code_and_one_sentence(servers, case):
    _, service, method, request, code, words = case
    got = grpc_error(servers[service], method, request)
    assert got is not None and got[0] == code, got
    assert words in got[1] and "\n" not in got[1]


def test_the_server_keeps_serving_after_the_bad_calls(exported, servers):
    _, base = exported
    reference = tf.saved_model.load(str(base / "1")).signatures["serving_default"]
    response = servers[0].Predict(predict_request(images=GOOD), timeout=60)
    np.testing.assert_array_equal(outputs(response)["probabilities"],
                                  reference(images=tf.constant(GOOD))["probabilities"])


def test_labels_reach_their_versions_over_grpc(exported, tmp_path):
    model, base = exported
    pushed = tmp_path / NAME
    export_saved_model(model, pushed, [f"v1-{i}" for i in range(10)])
    export_saved_model(model, pushed, [f"v2-{i}" for i in range(10)])
    with both_servers(pushed, labels={"stable": 1, "canary": 2}) as (
            prediction, model_service, _):
        for label, version in (("stable", 1), ("canary", 2)):
            request = _with(predict_request(images=GOOD), version_label=label)
            response = prediction.Predict(request, timeout=60)
            assert response.model_spec.version.value == version
            assert outputs(response)["class_names"][0].startswith(
                f"v{version}-".encode())
        latest = prediction.Predict(predict_request(images=GOOD), timeout=60)
        assert latest.model_spec.version.value == 2
        states = model_service.GetModelStatus(_status_request(name=NAME), timeout=60)
        assert sorted(s.version for s in states.model_version_status) == [1, 2]


# --- the command line ---------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_cli_serves_rest_and_grpc_side_by_side(exported):
    _, base = exported
    port = _free_port()
    with serve_cli("--model-base-path", str(base), "--model-name", NAME,
                   "--port", "0", "--grpc-port", str(port)) as line:
        assert f"; gRPC at 127.0.0.1:{port};" in line, line
        url = line.split(" at ", 1)[1].split(";", 1)[0]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            response = stub.Predict(predict_request(images=GOOD), timeout=60)
        rest = rest_predict(url, {"instances": GOOD.tolist()})["predictions"]
        np.testing.assert_array_equal(outputs(response)["probabilities"][0],
                                      np.float32(rest[0]["probabilities"]))


@pytest.mark.e2e
def test_cli_reports_a_grpc_port_in_use_in_one_line(exported):
    _, base = exported
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "stl10_keras.serve", "--model-base-path", str(base),
             "--port", "0", "--grpc-port", str(port)],
            cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
            timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0]
    assert "--grpc-port" in errors[0]


def test_a_grey_28x28_model_is_served_with_its_own_shape(tmp_path):
    # Shapes and channels come from the signature (a Fashion-MNIST-sized model).
    keras.utils.set_random_seed(1)
    model = build_model(preset("smoke", "digits"), (28, 28, 1))
    base = tmp_path / NAME
    export_saved_model(model, base, [f"c{i}" for i in range(10)])
    x = np.random.default_rng(9).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    want = keras.ops.convert_to_numpy(
        keras.ops.softmax(model(x.astype("float32"), training=False)))
    with both_servers(base) as (prediction, _, url):
        got = outputs(prediction.Predict(predict_request(images=x), timeout=60))
        np.testing.assert_allclose(got["probabilities"], want, rtol=1e-5, atol=1e-6)
        rest = rest_predict(url, {"instances": x.tolist()})["predictions"]
        np.testing.assert_array_equal(
            np.float32([p["probabilities"] for p in rest]), got["probabilities"])
        grey = np.array([png(image[..., 0]) for image in x], dtype=object)
        by_png = outputs(prediction.Predict(
            predict_request("serving_bytes", image_bytes=grey), timeout=60))
        np.testing.assert_array_equal(by_png["probabilities"], got["probabilities"])
        wrong = grpc_error(prediction, "Predict", predict_request(images=GOOD))
        assert wrong[0] == INVALID and "[N, 28, 28, 1]" in wrong[1]


def _strings(*values):
    array = np.empty(len(values), object)
    array[:] = values
    return array


@pytest.mark.parametrize("array", [
    np.array([3]), np.array([3], np.int32), np.float32([[0.5]]),
    np.random.default_rng(0).random((5, 10), np.float32), np.zeros((2, 3), np.uint8),
    _strings(b"3"), _strings(b"7", b"x\x00"), np.array([True]),
    np.zeros((0, 10), np.float32)])
def test_output_protos_are_the_ones_make_tensor_proto_makes(array):
    from stl10_keras.serving.codec import tensor_proto

    assert tensor_proto(array) == tf.make_tensor_proto(array)
