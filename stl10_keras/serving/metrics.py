"""Prometheus metrics of the server, under TF Serving's metric names.

TF Serving exports its monitoring metrics on the REST port at
`/monitoring/prometheus/metrics` (its `--monitoring_config_file`), named from
its `/tensorflow/serving/...` metrics with `/` as `:`. The same names and labels
are used here where the meaning is the same, so a dashboard written for TF
Serving finds them:

    :tensorflow:serving:request_count          counter: model_name, status, and
                                               (beyond TF Serving's) API,
                                               entrypoint, signature_name
    :tensorflow:serving:request_latency        histogram, microseconds:
                                               model_name, API, entrypoint
    :tensorflow:serving:batching_session:queuing_latency       microseconds
    :tensorflow:serving:batching_session:input_batch_size      examples/request
    :tensorflow:serving:batching_session:processed_batch_size  after padding
    :tensorflow:serving:batching_session:padding_size          per batch size
    :tensorflow:serving:batching_session:queue_depth           gauge (not in TF
                                               Serving): requests waiting

(`prometheus_client` writes a counter's samples with a `_total` suffix.)
"""

from __future__ import annotations

from typing import Any

#: TF Serving's latency buckets (`Buckets::Exponential(10, 1.8, 33)`, ~20 min).
LATENCY_BUCKETS = tuple(10 * 1.8**i for i in range(33))
#: Its queuing latency buckets (`Exponential(100, 1.2, 52)`, ~1 s).
QUEUING_BUCKETS = tuple(100 * 1.2**i for i in range(52))
#: Its batch size buckets (`Exponential(1, 2, 14)`).
SIZE_BUCKETS = tuple(2.0**i for i in range(14))
#: TF Serving's default metrics path (`PrometheusExporter::kPrometheusPath`).
METRICS_PATH = "/monitoring/prometheus/metrics"
#: The label of a model or signature name this server does not serve: names a
#: client sends are not labels of their own, so no client can add series.
UNKNOWN = "(unknown)"


class ServingMetrics:
    """The metrics of one server, in a registry of their own (two servers in
    one process, as in the tests, do not share counts).

    Attributes:
        registry: the `prometheus_client.CollectorRegistry`.
    """

    def __init__(self) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            disable_created_metrics,
        )

        # No `*_created` series beside each counter and histogram (TF Serving
        # has none); a process-wide switch, which suits a server process.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        prefix = ":tensorflow:serving:"
        batching = prefix + "batching_session:"
        self.request_count = Counter(
            prefix + "request_count", "The total number of requests.",
            ["model_name", "API", "entrypoint", "signature_name", "status"],
            registry=self.registry)
        self.request_latency = Histogram(
            prefix + "request_latency",
            "Distribution of wall time (in microseconds) for Tensorflow Serving "
            "request.", ["model_name", "API", "entrypoint"],
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queuing_latency = Histogram(
            batching + "queuing_latency",
            "Distribution of wall time spent (in microseconds) in queuing",
            ["thread_pool_name"], buckets=QUEUING_BUCKETS, registry=self.registry)
        self.input_batch_size = Histogram(
            batching + "input_batch_size",
            "Tracks the batch size distribution on the inputs.",
            buckets=SIZE_BUCKETS, registry=self.registry)
        self.processed_batch_size = Histogram(
            batching + "processed_batch_size",
            "Tracks the batch size distribution on processing.",
            buckets=SIZE_BUCKETS, registry=self.registry)
        self.padding_size = Histogram(
            batching + "padding_size",
            "Tracks the padding size distribution on batches.",
            ["execution_batch_size"], buckets=SIZE_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge(
            batching + "queue_depth",
            "Requests (or parts of split requests) waiting in the batching queues.",
            ["thread_pool_name"], registry=self.registry)

    def record(self, record: RequestRecord, status: str, seconds: float) -> None:
        """Count one answered request; its latency too when it succeeded (as TF
        Serving records latency for OK requests only)."""
        self.request_count.labels(record.model_name, record.api, record.entrypoint,
                                  record.signature_name, status).inc()
        if status == "OK":
            self.request_latency.labels(record.model_name, record.api,
                                        record.entrypoint).observe(seconds * 1e6)

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text page and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestRecord:
    """What one request's metrics are labelled with, filled in as it is parsed.

    Args:
        entrypoint: "REST" or "GRPC" (TF Serving's values).
        api: TF Serving's API name ("Predict", "GetModelMetadata", ...).
    """

    __slots__ = ("entrypoint", "api", "model_name", "signature_name")

    def __init__(self, entrypoint: str, api: str = UNKNOWN):
        self.entrypoint = entrypoint
        self.api = api
        self.model_name = UNKNOWN
        self.signature_name = ""

    def named(self, served: str, name: Any) -> None:
        """The model name the request named: a label only if it is `served`."""
        self.model_name = served if name == served else UNKNOWN

    def signed(self, signatures: Any, name: Any) -> None:
        """The signature it named (`""`: serving_default), if the model has it."""
        name = name or "serving_default"
        self.signature_name = name if name in signatures else UNKNOWN
