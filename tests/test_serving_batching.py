"""Server-side batching, bounded queues and deadlines, over real HTTP and gRPC
with TF Serving's own client stubs.

References are independent of the batcher: the exported signatures called on
each request alone (`tf.saved_model.load`), the defaults in TensorFlow's own
`shared_batch_scheduler.h`, the message as TF Serving's `.proto` declares it and
TF Serving's own example files, and the counts `prometheus_client`'s parser
reads off the metrics page.
"""

import base64
import http.client
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import descriptor_pb2, text_format
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import prediction_service_pb2_grpc

from conftest import (ROOT, export_sharp_model, predict_request, rest_server,
                      serve_cli, subprocess_env)
from stl10_keras.errors import UsageError
from stl10_keras.serving.batching import (
    Batcher,
    BatchingOptions,
    Deadline,
    DirectRunner,
    options_from_message,
    read_batching_parameters,
)
from stl10_keras.serving.errors import RequestError
from stl10_keras.serving.grpc import GrpcServer
from stl10_keras.serving.metrics import METRICS_PATH, ServingMetrics
from stl10_keras.serving.protos import (
    batching_parameters_class,
    monitoring_config_class,
)
from stl10_keras.serving.repository import ModelRepository

NAME = "digits"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
PREFIX = ":tensorflow:serving:"

# TF Serving's message, as `servables/tensorflow/session_bundle_config.proto`
# declares it (comments dropped).
BATCHING_PROTO = """
message BatchingParameters {
  google.protobuf.Int64Value max_batch_size = 1;
  google.protobuf.Int64Value batch_timeout_micros = 2;
  google.protobuf.Int64Value max_enqueued_batches = 3;
  google.protobuf.Int64Value num_batch_threads = 4;
  google.protobuf.StringValue thread_pool_name = 5;
  google.protobuf.BoolValue enable_large_batch_splitting = 8;
  google.protobuf.Int64Value max_execution_batch_size = 9;
  repeated int64 allowed_batch_sizes = 6;
  bool pad_variable_length_inputs = 7;
}
"""
# `config/monitoring_config.proto`.
MONITORING_PROTO = """
message PrometheusConfig {
  bool enable = 1;
  string path = 2;
}
message MonitoringConfig {
  PrometheusConfig prometheus_config = 1;
}
"""
# TF Serving's own example files (`servables/tensorflow/testdata/`).
TF_SERVING_BATCHING_CONFIG = """max_batch_size { value: 128 }
batch_timeout_micros { value: 0 }
max_enqueued_batches { value: 1000000 }
num_batch_threads { value: 8 }
"""
TF_SERVING_MONITORING_CONFIG = """prometheus_config: {
  enable: true,
  path: "/monitoring/prometheus/metrics"
}
"""


# --- the parameters ------------------------------------------------------------------

def declared_fields(proto_text: str, message: str) -> dict:
    """name -> (number, label, type) of a message in `.proto` text."""
    body = re.search(rf"message {message} {{(.*?)}}", proto_text, re.S)[1]
    fields = {}
    for repeated, kind, name, number in re.findall(
            r"(repeated )?([\w.]+) (\w+) = (\d+);", body):
        fields[name] = (int(number), bool(repeated), kind.split(".")[-1])
    return fields


def built_fields(descriptor) -> dict:
    kinds = descriptor_pb2.FieldDescriptorProto
    names = {kinds.TYPE_BOOL: "bool", kinds.TYPE_INT64: "int64",
             kinds.TYPE_STRING: "string"}
    return {f.name: (f.number, f.is_repeated,
                     f.message_type.name if f.message_type else names[f.type])
            for f in descriptor.fields}


def test_the_messages_are_tf_servings():
    batching = batching_parameters_class().DESCRIPTOR
    assert batching.full_name == "tensorflow.serving.BatchingParameters"
    assert built_fields(batching) == declared_fields(BATCHING_PROTO,
                                                     "BatchingParameters")
    monitoring = monitoring_config_class().DESCRIPTOR
    assert monitoring.full_name == "tensorflow.serving.MonitoringConfig"
    assert built_fields(monitoring) == declared_fields(MONITORING_PROTO,
                                                       "MonitoringConfig")
    prometheus = monitoring.fields_by_name["prometheus_config"].message_type
    assert built_fields(prometheus) == declared_fields(MONITORING_PROTO,
                                                       "PrometheusConfig")


def test_the_defaults_are_tensorflows_batch_scheduler():
    header = (Path(tf.sysconfig.get_include()) / "tensorflow" / "core" / "kernels"
              / "batching_util" / "shared_batch_scheduler.h").read_text()

    def default(name):
        return re.search(rf"\b{name} = \{{?([^;}}]+)\}}?;", header)[1].strip()

    options = BatchingOptions()
    assert options.max_batch_size == int(default("input_batch_size_limit"))
    assert options.batch_timeout_micros == int(default("batch_timeout_micros"))
    assert options.max_enqueued_batches == int(default("max_enqueued_batches"))
    assert f'"{options.thread_pool_name}"' == default("thread_pool_name")
    assert default("num_batch_threads") == "port::MaxParallelism()"
    assert options.num_batch_threads == len(os.sched_getaffinity(0))
    assert options.enable_large_batch_splitting is (
        default("enable_large_batch_splitting") == "true")
    assert options.allowed_batch_sizes == ()
    assert options.pad_variable_length_inputs is False


def test_tf_servings_own_example_files_parse(tmp_path):
    path = tmp_path / "batching_config.txt"
    path.write_text(TF_SERVING_BATCHING_CONFIG)
    options = read_batching_parameters(path)
    assert (options.max_batch_size, options.batch_timeout_micros,
            options.max_enqueued_batches, options.num_batch_threads) == (
        128, 0, 1000000, 8)
    config = monitoring_config_class()()
    text_format.Parse(TF_SERVING_MONITORING_CONFIG, config)
    assert config.prometheus_config.enable
    assert config.prometheus_config.path == METRICS_PATH


@pytest.mark.parametrize("text, words", [
    ("max_batch_sise { value: 8 }", "has no field named \"max_batch_sise\""),
    ("max_batch_size: 8", "max_batch_size"),
    ("max_batch_size { value: 0 }", "max_batch_size must be positive; it is 0"),
    ("num_batch_threads { value: -1 }", "num_batch_threads must be positive"),
    ("batch_timeout_micros { value: -5 }", "batch_timeout_micros must be 0 or more"),
    ("max_batch_size { value: 32 } allowed_batch_sizes: 8 allowed_batch_sizes: 16",
     "last entry was 16, expected 32"),
    ("max_batch_size { value: 32 } allowed_batch_sizes: 16 allowed_batch_sizes: 8",
     "positive and increasing"),
    ("max_batch_size { value: 8 } enable_large_batch_splitting { value: true } "
     "max_execution_batch_size { value: 16 }", "max_execution_batch_size must be"),
])
def test_a_bad_batching_file_is_one_sentence(tmp_path, text, words):
    path = tmp_path / "batching.txt"
    path.write_text(text)
    with pytest.raises(UsageError) as error:
        read_batching_parameters(path)
    message = str(error.value)
    assert words in message and "\n" not in message and str(path) in message


# --- the scheduler, with a signature that waits until released ------------------------

class Gate:
    """A signature that records each batch it computes and, until `release()`,
    blocks in it: the batch threads stay busy while the test fills the queue."""

    def __init__(self):
        self.batches = []
        self.released = threading.Event()

    def __call__(self, x):
        self.batches.append(x.numpy().tolist())
        assert self.released.wait(30)
        return {"y": x * 2}

    def release(self):
        self.released.set()


def queue_depth(metrics):
    return metrics.registry.get_sample_value(
        PREFIX + "batching_session:queue_depth", {"thread_pool_name": "batch_threads"})


def until(condition, seconds=20.0):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


@contextmanager
def gated_batcher(**options):
    metrics = ServingMetrics()
    batcher = Batcher(BatchingOptions(num_batch_threads=1, **options), metrics)
    gate = Gate()
    pool = ThreadPoolExecutor(16)
    try:
        yield batcher, gate, metrics, pool
    finally:
        gate.release()
        pool.shutdown()
        batcher.stop()


def submit(pool, batcher, gate, values, deadline=None):
    inputs = {"x": np.array(values, np.int64)}
    return pool.submit(batcher.run, "s", gate, inputs, True, deadline)


def test_a_full_queue_refuses_at_once_and_the_queued_requests_are_answered():
    with gated_batcher(max_batch_size=2, max_enqueued_batches=2) as (
            batcher, gate, metrics, pool):
        first = submit(pool, batcher, gate, [0])
        until(lambda: gate.batches)  # taken by the one batch thread, which waits
        queued = []
        for i in range(1, 5):  # two full batches of two
            queued.append(submit(pool, batcher, gate, [i]))
            until(lambda: queue_depth(metrics) == i)
        started = time.monotonic()
        with pytest.raises(RequestError) as refused:
            batcher.run("s", gate, {"x": np.array([5])})
        assert time.monotonic() - started < 1.0
        assert refused.value.status == 503
        assert refused.value.grpc_code == "UNAVAILABLE"
        assert "queue is full" in refused.value.message
        gate.release()
        for i, future in enumerate([first, *queued]):
            assert future.result(30)["y"].tolist() == [2 * i]
    assert gate.batches == [[0], [1, 2], [3, 4]]


def test_a_request_past_its_deadline_is_not_computed():
    with gated_batcher(max_batch_size=4) as (batcher, gate, metrics, pool):
        submit(pool, batcher, gate, [0])
        until(lambda: gate.batches)
        late = submit(pool, batcher, gate, [7],
                      Deadline(time.monotonic() + 0.2, "Too late."))
        error = late.exception(30)
        assert isinstance(error, RequestError)
        assert (error.status, error.grpc_code, error.message) == (
            504, "DEADLINE_EXCEEDED", "Too late.")
        gate.release()
        on_time = submit(pool, batcher, gate, [8])
        assert on_time.result(30)["y"].tolist() == [16]
    assert gate.batches == [[0], [8]]  # 7 never reached the signature


def test_without_batching_a_late_request_is_not_computed_either():
    gate = Gate()
    gate.release()
    with pytest.raises(RequestError) as error:
        DirectRunner().run("s", gate, {"x": np.array([1])}, True,
                           Deadline(time.monotonic() - 0.001, "Too late."))
    assert error.value.status == 504 and gate.batches == []


def test_requests_merge_up_to_max_batch_size_and_pad_to_an_allowed_size():
    with gated_batcher(max_batch_size=8, allowed_batch_sizes=(2, 4, 8),
                       batch_timeout_micros=10**7) as (batcher, gate, metrics, pool):
        gate.release()
        futures = []
        for i, n in enumerate([3, 1, 4]):  # 8: a full batch, taken at once
            futures.append(submit(pool, batcher, gate,
                                  list(range(10 * i, 10 * i + n))))
            until(lambda: gate.batches or queue_depth(metrics) == i + 1)
        for i, (n, future) in enumerate(zip([3, 1, 4], futures)):
            assert future.result(30)["y"].tolist() == [
                2 * v for v in range(10 * i, 10 * i + n)]
        assert gate.batches == [[0, 1, 2, 10, 20, 21, 22, 23]]
        three = submit(pool, batcher, gate, [30, 31, 32])  # waits for the timeout
        until(lambda: queue_depth(metrics) == 1)
        batcher.stop()  # ... and is answered now: the server is stopping
        assert three.exception(30).status == 503
    with gated_batcher(max_batch_size=8, allowed_batch_sizes=(2, 4, 8)) as (
            batcher, gate, metrics, pool):
        gate.release()
        assert batcher.run("s", gate, {"x": np.array([5, 6, 7])})["y"].tolist() == [
            10, 12, 14]
        assert gate.batches == [[5, 6, 7, 5]]  # padded with the first row, 5
    padding = metrics.registry.get_sample_value(
        PREFIX + "batching_session:padding_size_sum", {"execution_batch_size": "4"})
    assert padding == 1


def test_a_large_request_is_split_across_batches_when_enabled():
    with gated_batcher(max_batch_size=8, enable_large_batch_splitting=True,
                       max_execution_batch_size=3) as (
            batcher, gate, metrics, pool):
        gate.release()
        big = submit(pool, batcher, gate, list(range(8)))
        assert big.result(30)["y"].tolist() == [2 * v for v in range(8)]
        assert gate.batches == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_variable_length_inputs_batch_apart_or_padded():
    rows = [[1, 2], [3, 4, 5]]
    for pad in (False, True):
        with gated_batcher(max_batch_size=8, pad_variable_length_inputs=pad,
                           batch_timeout_micros=300_000) as (
                batcher, gate, metrics, pool):
            gate.release()
            futures = []
            for i, r in enumerate(rows):
                futures.append(submit(pool, batcher, gate, [r]))
                until(lambda: queue_depth(metrics) == i + 1)
            results = [f.result(30)["y"].tolist() for f in futures]
        if pad:  # padded with each request's first element, as TF Serving
            assert gate.batches == [[[1, 2, 1], [3, 4, 5]]]
            assert results == [[[2, 4, 2]], [[6, 8, 10]]]
        else:
            assert sorted(map(len, gate.batches)) == [1, 1]
            assert results == [[[2, 4]], [[6, 8, 10]]]


# --- the model over both APIs -------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, base = export_sharp_model(tmp_path_factory.mktemp("batching"), NAME)
    return base


@pytest.fixture(scope="module")
def reference(exported):
    return tf.saved_model.load(str(exported / "1")).signatures


@contextmanager
def servers(base, options=None, timeout_ms=30000, metrics_path=METRICS_PATH):
    """REST and gRPC servers sharing one repository, metrics and runner."""
    repository = ModelRepository(base, NAME)
    repository.start()
    metrics = ServingMetrics()
    runner = DirectRunner() if options is None else Batcher(options, metrics)
    try:
        with rest_server(repository, threads=32, max_body_bytes=2**22,
                         runner=runner, metrics=metrics, timeout_ms=timeout_ms,
                         metrics_path=metrics_path) as rest, \
                GrpcServer(repository, "127.0.0.1", 0, threads=32,
                           max_message_bytes=2**22, runner=runner,
                           metrics=metrics) as server:
            channel = grpc.insecure_channel(server.address)
            try:
                yield (f"{rest.url}/v1/models/{NAME}",
                       prediction_service_pb2_grpc.PredictionServiceStub(channel),
                       f"{rest.url}{metrics_path or METRICS_PATH}")
            finally:
                channel.close()
    finally:
        runner.stop()


def images(seed, n):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3),
                                                dtype=np.uint8)


def png(image) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def rest(url, body, timeout=120):
    request = urllib.request.Request(f"{url}:predict", json.dumps(body).encode())
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())




def send(kind, url, stub, x):
    """One request of `kind` for images `x`; returns its probabilities."""
    if kind == "REST rows":
        status, body = rest(url, {"instances": x.tolist()})
        assert status == 200, body
        return np.array([p["probabilities"] for p in body["predictions"]],
                        np.float32)
    if kind == "REST columns, PNG":
        status, body = rest(url, {"signature_name": "serving_bytes", "inputs": [
            {"b64": base64.b64encode(png(i)).decode()} for i in x]})
        assert status == 200, body
        return np.array(body["outputs"]["probabilities"], np.float32)
    if kind == "gRPC":
        response = stub.Predict(predict_request(images=x), timeout=120)
    else:  # gRPC, PNG
        response = stub.Predict(predict_request(
            "serving_bytes", image_bytes=np.array([png(i) for i in x], object)),
            timeout=120)
    return tf.make_ndarray(response.outputs["probabilities"])


def scrape(metrics_url) -> dict:
    """The metrics page, parsed by prometheus_client: {sample name: [(labels,
    value)]}."""
    with _OPENER.open(metrics_url, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        page = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples, name, **labels):
    """The sum of a sample's values over the series that have `labels`."""
    return sum(v for got, v in samples.get(name, [])
               if all(got.get(k) == w for k, w in labels.items()))


KINDS = ["REST rows", "REST columns, PNG", "gRPC", "gRPC, PNG"]


def test_batched_answers_equal_the_model_alone_for_mixed_concurrent_requests(
        exported, reference):
    options = BatchingOptions(max_batch_size=16, allowed_batch_sizes=(4, 8, 16),
                              batch_timeout_micros=100_000, num_batch_threads=1,
                              max_enqueued_batches=100)
    jobs = [(KINDS[i % 4], images(i, 1 + i % 5)) for i in range(24)]
    with servers(exported, options) as (url, stub, metrics_url):
        with ThreadPoolExecutor(24) as pool:
            got = list(pool.map(lambda job: send(job[0], url, stub, job[1]), jobs))
        samples = scrape(metrics_url)
    for (kind, x), probabilities in zip(jobs, got):
        if "PNG" in kind:
            alone = reference["serving_bytes"](image_bytes=tf.constant(
                [png(i) for i in x]))
        else:
            alone = reference["serving_default"](images=tf.constant(x))
        want = alone["probabilities"].numpy()
        np.testing.assert_allclose(probabilities, want, rtol=1e-5, atol=1e-6,
                                   err_msg=kind)
        assert (probabilities.argmax(1) == want.argmax(1)).all()
    batch = PREFIX + "batching_session:"
    batches = value(samples, batch + "processed_batch_size_count")
    assert batches < len(jobs)  # requests were merged
    assert value(samples, batch + "input_batch_size_sum") == sum(
        len(x) for _, x in jobs)
    padded_to = {labels["execution_batch_size"]
                 for labels, _ in samples[batch + "padding_size_count"]}
    assert padded_to <= {"4", "8", "16"}
    assert value(samples, PREFIX + "request_count_total", API="Predict",
                 status="OK") == len(jobs)


def test_a_request_that_fails_in_a_batch_fails_alone(exported, reference):
    options = BatchingOptions(max_batch_size=16, batch_timeout_micros=300_000,
                              num_batch_threads=1)
    truncated = png(images(99, 1)[0])[:120]  # a PNG header, then nothing
    good = images(5, 3)
    with servers(exported, options) as (url, stub, _):
        with ThreadPoolExecutor(8) as pool:
            bad_rest = pool.submit(rest, url, {
                "signature_name": "serving_bytes",
                "instances": [{"b64": base64.b64encode(png(good[0])).decode()},
                              {"b64": base64.b64encode(truncated).decode()}]})
            bad_grpc = pool.submit(stub.Predict, predict_request(
                "serving_bytes", image_bytes=np.array([truncated], object)), 120)
            fine = [pool.submit(send, kind, url, stub, good) for kind in KINDS]
            status, body = bad_rest.result()
            assert status == 400
            assert body["error"].startswith(
                "Instance 1 of 'image_bytes' could not be decoded")
            with pytest.raises(grpc.RpcError) as error:
                bad_grpc.result()
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "could not be decoded" in error.value.details()
            pixels = reference["serving_default"](images=tf.constant(good))
            pngs = reference["serving_bytes"](image_bytes=tf.constant(
                [png(i) for i in good]))
            for kind, future in zip(KINDS, fine):
                want = pngs if "PNG" in kind else pixels
                np.testing.assert_allclose(future.result(), want["probabilities"],
                                           rtol=1e-5, atol=1e-6, err_msg=kind)
        too_many = images(6, 17)
        status, body = rest(url, {"instances": too_many.tolist()})
        assert status == 400 and "max_batch_size of 16" in body["error"]
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(predict_request(images=too_many), timeout=60)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_deadlines_over_grpc_and_the_rest_timeout(exported):
    # A lone request waits for batch_timeout_micros (2 s) for others to join:
    # longer than its deadline, so it is answered at its deadline, uncomputed.
    options = BatchingOptions(max_batch_size=8, batch_timeout_micros=2_000_000,
                              num_batch_threads=1)
    x = images(3, 1)
    with servers(exported, options, timeout_ms=500) as (url, stub, metrics_url):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(predict_request(images=x), timeout=0.5)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        status, body = rest(url, {"instances": x.tolist()})
        assert time.monotonic() - started < 1.9
        assert status == 504
        assert body["error"] == (
            "The request was not answered within this server's "
            "--rest-api-timeout-in-ms of 500 ms; send it again later or with fewer "
            "instances.")
        time.sleep(2.5)  # both batches have been taken by now
        samples = scrape(metrics_url)
    batch = PREFIX + "batching_session:"
    assert value(samples, batch + "processed_batch_size_count") == 0
    for entrypoint in ("GRPC", "REST"):
        assert value(samples, PREFIX + "request_count_total", entrypoint=entrypoint,
                     status="DEADLINE_EXCEEDED") == 1, entrypoint


def test_unbatched_a_rest_request_past_the_timeout_is_a_504(exported):
    with servers(exported, timeout_ms=1) as (url, stub, _):
        status, body = rest(url, {"instances": images(3, 1).tolist()})
        assert status == 504 and "--rest-api-timeout-in-ms of 1 ms" in body["error"]
        with _OPENER.open(url, timeout=60) as response:  # status: no timeout
            assert response.status == 200


def test_options_from_a_message_without_fields_are_the_defaults():
    assert options_from_message(batching_parameters_class()()) == BatchingOptions()


# --- a flood, through the command line ------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """The process' resident memory now (`VmRSS` of /proc/PID/status), in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) / 1024


QUEUE_FULL = re.compile(r"The batching queue is full \(\d+ batches enqueued, "
                        r"max_enqueued_batches is 2\); send the request again later\.")


@pytest.mark.e2e
def test_a_flood_of_ten_times_the_queue_is_refused_and_memory_stays_bounded(
        exported, reference, tmp_path):
    batching = tmp_path / "batching.txt"
    batching.write_text("max_batch_size { value: 4 }\nmax_enqueued_batches { value: 2 }"
                        "\nnum_batch_threads { value: 1 }\n")
    monitoring = tmp_path / "monitoring.txt"
    monitoring.write_text('prometheus_config { enable: true, path: "/metrics" }\n')
    capacity = 2 * 4  # max_enqueued_batches x max_batch_size requests of one image
    clients = 10 * capacity  # half REST, half gRPC, each sending in a loop
    x = images(11, 1)
    want = reference["serving_default"](images=tf.constant(x))["probabilities"]
    body = json.dumps({"instances": x.tolist()}).encode()
    port = _free_port()
    with serve_cli("--model-base-path", str(exported), "--model-name", NAME,
                   "--port", "0", "--grpc-port", str(port), "--threads", "64",
                   "--enable-batching", "--batching-parameters-file", str(batching),
                   "--monitoring-config-file", str(monitoring),
                   with_process=True) as (line, proc):
        root = line.split(" at ", 1)[1].split("/v1/", 1)[0]
        url = f"{root}/v1/models/{NAME}"
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_request(images=x)
        for _ in range(5):  # warm both paths up before the baseline
            assert rest(url, {"instances": x.tolist()})[0] == 200
            stub.Predict(request, timeout=60)
        before = rss_mb(proc.pid)
        outcomes, samples, stop = [], [before], threading.Event()

        def sample():
            while not stop.wait(0.05):
                samples.append(rss_mb(proc.pid))

        def rest_client():
            host, port_text = root.removeprefix("http://").rsplit(":", 1)
            connection = http.client.HTTPConnection(host, int(port_text), timeout=60)
            while not stop.is_set():
                connection.request("POST", f"/v1/models/{NAME}:predict", body)
                response = connection.getresponse()
                answer = json.loads(response.read())
                outcomes.append(("REST", response.status,
                                 answer.get("error") or answer["predictions"][0]))

        def grpc_client():
            while not stop.is_set():
                try:
                    response = stub.Predict(request, timeout=60)
                    outcomes.append(("gRPC", "OK", tf.make_ndarray(
                        response.outputs["probabilities"])[0]))
                except grpc.RpcError as e:
                    outcomes.append(("gRPC", e.code().name, e.details()))

        threads = [threading.Thread(target=sample)] + [
            threading.Thread(target=rest_client if i % 2 else grpc_client)
            for i in range(clients)]
        for thread in threads:
            thread.start()
        time.sleep(4.0)
        stop.set()
        for thread in threads:
            thread.join(120)
        after = rss_mb(proc.pid)
        samples_page = scrape(f"{root}/metrics")
        with pytest.raises(urllib.error.HTTPError) as missing:
            _OPENER.open(f"{root}{METRICS_PATH}", timeout=60)
        assert missing.value.code == 404
        channel.close()
    answered = [o for o in outcomes if o[1] in (200, "OK")]
    refused = {"REST": [o for o in outcomes if o[:2] == ("REST", 503)],
               "gRPC": [o for o in outcomes if o[:2] == ("gRPC", "UNAVAILABLE")]}
    assert len(answered) + len(refused["REST"]) + len(refused["gRPC"]) == len(
        outcomes), {o[:2] for o in outcomes}
    assert answered and refused["REST"] and refused["gRPC"]
    for _, _, sentence in refused["REST"] + refused["gRPC"]:
        assert QUEUE_FULL.fullmatch(sentence), sentence
    for kind, _, answer in answered:
        probabilities = answer["probabilities"] if kind == "REST" else answer
        np.testing.assert_allclose(probabilities, want[0], rtol=1e-5, atol=1e-6)
    unavailable = value(samples_page, PREFIX + "request_count_total",
                        status="UNAVAILABLE")
    assert unavailable == len(refused["REST"]) + len(refused["gRPC"])
    peak = max(samples)
    print(f"\nflood of {clients} clients (10x the queue's {capacity} requests), "
          f"4 s: {len(answered)} answered, {len(refused['REST'])} REST 503, "
          f"{len(refused['gRPC'])} gRPC UNAVAILABLE; server RSS {before:.0f} MB "
          f"before, peak {peak:.0f} MB ({len(samples)} samples), {after:.0f} MB "
          "after")
    assert peak - before < 100, (before, peak)


@pytest.mark.parametrize("flag, text, words", [
    ("--batching-parameters-file", "max_batch_size { value: 8 }\nmax_batch: 3\n",
     "is not a BatchingParameters text proto (2:1 :"),
    ("--batching-parameters-file", "num_batch_threads { value: 0 }",
     "num_batch_threads must be positive; it is 0."),
    ("--monitoring-config-file", "prometheus_config { enable: yes }",
     "is not a MonitoringConfig text proto"),
])
def test_the_command_refuses_a_bad_config_file_in_one_line(exported, tmp_path, flag,
                                                           text, words):
    path = tmp_path / "config.txt"
    path.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "stl10_keras.serve", "--model-base-path",
         str(exported), "--enable-batching", flag, str(path)],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and words in lines[0] and str(path) in lines[0], lines
