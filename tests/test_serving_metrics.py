"""The Prometheus page on the REST port, scraped over HTTP and read with
`prometheus_client`'s own text parser; the counts are the requests this test
sent, each answered through TF Serving's own client stubs or plain HTTP."""

import base64
import json
import urllib.error
import urllib.request

import grpc
import pytest
from tensorflow_serving.apis import get_model_metadata_pb2

from stl10_keras.errors import UsageError
from stl10_keras.serving.batching import BatchingOptions
from stl10_keras.serving.cli import _metrics_path
from stl10_keras.serving.metrics import LATENCY_BUCKETS, METRICS_PATH
from conftest import predict_request
from test_serving_batching import (  # noqa: F401  (exported is a fixture)
    NAME,
    PREFIX,
    exported,
    images,
    png,
    rest,
    scrape,
    servers,
    value,
)

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
COUNT = PREFIX + "request_count_total"
LATENCY = PREFIX + "request_latency"
BATCH = PREFIX + "batching_session:"


@pytest.fixture(scope="module")
def scraped(exported):
    """The page after a known set of requests through both APIs."""
    with servers(exported, BatchingOptions(num_batch_threads=1)) as (
            url, stub, metrics_url):
        for n in (1, 2):
            assert rest(url, {"instances": images(n, n).tolist()})[0] == 200
        assert rest(url, {"signature_name": "serving_bytes", "instances": [
            {"b64": base64.b64encode(png(images(3, 1)[0])).decode()}]})[0] == 200
        assert rest(url, {"instances": [[1.5]]})[0] == 400
        assert rest(url.replace(NAME, "other"), {"instances": [[1]]})[0] == 404
        with _OPENER.open(url, timeout=60) as response:  # status
            assert response.status == 200
        stub.Predict(predict_request(images=images(4, 1)), timeout=60)
        request = predict_request(images=images(4, 1))
        request.model_spec.name = "other"
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(request, timeout=60)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        metadata = get_model_metadata_pb2.GetModelMetadataRequest(
            metadata_field=["signature_def"])
        metadata.model_spec.name = NAME
        stub.GetModelMetadata(metadata, timeout=60)
        yield scrape(metrics_url)


@pytest.mark.parametrize("labels, count", [
    (dict(model_name=NAME, API="Predict", entrypoint="REST",
          signature_name="serving_default", status="OK"), 2),
    (dict(model_name=NAME, API="Predict", entrypoint="REST",
          signature_name="serving_bytes", status="OK"), 1),
    (dict(model_name=NAME, API="Predict", entrypoint="REST",
          signature_name="serving_default", status="INVALID_ARGUMENT"), 1),
    (dict(model_name="(unknown)", API="Predict", entrypoint="REST",
          status="NOT_FOUND"), 1),
    (dict(model_name=NAME, API="GetModelStatus", entrypoint="REST", status="OK"), 1),
    (dict(model_name=NAME, API="Predict", entrypoint="GRPC",
          signature_name="serving_default", status="OK"), 1),
    (dict(model_name="(unknown)", API="Predict", entrypoint="GRPC",
          status="NOT_FOUND"), 1),
    (dict(model_name=NAME, API="GetModelMetadata", entrypoint="GRPC",
          status="OK"), 1),
])
def test_requests_are_counted_by_model_signature_front_end_and_status(
        scraped, labels, count):
    assert value(scraped, COUNT, **labels) == count
    assert value(scraped, COUNT) == 9  # no other request was counted


def test_latency_histograms_have_tf_servings_buckets_and_count_ok_requests(scraped):
    rest_predict = dict(model_name=NAME, API="Predict", entrypoint="REST")
    assert value(scraped, LATENCY + "_count", **rest_predict) == 3
    buckets = [(float(labels["le"]), v) for labels, v in scraped[LATENCY + "_bucket"]
               if all(labels[k] == w for k, w in rest_predict.items())]
    assert [le for le, _ in buckets] == [*LATENCY_BUCKETS, float("inf")]
    assert buckets[:2] == [(10.0, 0), (18.0, 0)]  # microseconds: 10 * 1.8**i
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and counts[-1] == 3
    assert value(scraped, LATENCY + "_sum", **rest_predict) > 0


def test_batch_sizes_and_queue_depth(scraped):
    # The predictions that reached the batcher: of 1, 2 and 1 (PNG) images over
    # REST, of 1 over gRPC (no allowed_batch_sizes: no padding).
    assert value(scraped, BATCH + "input_batch_size_count") == 4
    assert value(scraped, BATCH + "input_batch_size_sum") == 1 + 2 + 1 + 1
    assert value(scraped, BATCH + "processed_batch_size_sum") == 5
    assert value(scraped, BATCH + "padding_size_sum") == 0
    assert value(scraped, BATCH + "queuing_latency_count",
                 thread_pool_name="batch_threads") == 4
    assert value(scraped, BATCH + "queue_depth",
                 thread_pool_name="batch_threads") == 0


def test_the_monitoring_config_file_is_tf_servings(tmp_path):
    path = tmp_path / "monitoring.txt"
    path.write_text('prometheus_config { enable: true, path: "/metrics" }')
    assert _metrics_path(str(path)) == "/metrics"
    path.write_text("prometheus_config { enable: true }")
    assert _metrics_path(str(path)) == METRICS_PATH
    path.write_text("prometheus_config { enable: false }")
    assert _metrics_path(str(path)) is None
    assert _metrics_path(None) == METRICS_PATH  # on by default
    path.write_text("prometheus_config { enabled: true }")
    with pytest.raises(UsageError) as error:
        _metrics_path(str(path))
    assert "is not a MonitoringConfig text proto" in str(error.value)
    assert "\n" not in str(error.value)


def test_no_metrics_page_when_disabled(exported):
    with servers(exported, metrics_path=None) as (url, _, metrics_url):
        try:
            _OPENER.open(metrics_url, timeout=60)
            status, body = 200, {}
        except urllib.error.HTTPError as e:
            status, body = e.code, json.loads(e.read())
        assert status == 404 and body["error"].startswith("Unknown path")
        assert rest(url, {"instances": images(1, 1).tolist()})[0] == 200
