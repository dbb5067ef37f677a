"""The command line of the model server, which `python -m stl10_keras.serve` runs."""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import socket
import sys
import threading
from typing import Callable, Sequence, TypeVar

from stl10_keras import errors, flags, runtime
from stl10_keras.serving.repository import DEFAULT_SETTLE_SECONDS, ModelRepository
from stl10_keras.serving.rest import (
    DEFAULT_MAX_BODY_MB,
    DEFAULT_THREADS,
    DEFAULT_TIMEOUT_MS,
    ModelServer,
)
from stl10_keras.serving.server import Server

#: The longest --poll-seconds and --settle-seconds (a day): a longer wait ends
#: in threading's OverflowError, far from the flag.
DAY = 86400.0

AnyServer = TypeVar("AnyServer", bound=Server)


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


def _labels(text: str) -> dict[str, int]:
    """`stable=2,canary=3` -> {"stable": 2, "canary": 3}."""
    from stl10_keras.serving.errors import RequestError
    from stl10_keras.serving.repository import parse_version

    labels = {}
    for item in text.split(","):
        label, sep, version = item.partition("=")
        label, version = label.strip(), version.strip()
        if not sep or not re.fullmatch(r"[^/:\s]+", label) or label in labels:
            raise argparse.ArgumentTypeError(
                f"'{item}' is not LABEL=VERSION (a label once, without '/', ':' or "
                "spaces); pass e.g. stable=2,canary=3")
        try:
            labels[label] = parse_version(version)
        except RequestError:
            raise argparse.ArgumentTypeError(
                f"the version of '{item}' is not a whole number below 2**63; pass "
                "e.g. stable=2,canary=3") from None
    return labels


def build_parser() -> argparse.ArgumentParser:
    parser = flags.ArgumentParser(
        prog="python -m stl10_keras.serve",
        description="Serve a SavedModel base path with TF Serving's REST API "
                    "(status, metadata, :predict) and its gRPC API "
                    "(PredictionService, ModelService); the highest version is "
                    "served and newly exported versions are picked up while "
                    "running.")
    parser.add_argument("--model-base-path", required=True,
                        help="the model base path, saved_models/NAME (holds 1/, "
                             "2/, ...)")
    parser.add_argument("--model-name", default=None,
                        help="the NAME in /v1/models/NAME (default: the base path's "
                             "folder name)")
    parser.add_argument("--port", type=flags.port, default=8501,
                        help="TCP port (default 8501, TF Serving's REST port; 0: any "
                             "free port)")
    parser.add_argument("--grpc-port", type=flags.port, default=8500,
                        help="TCP port of the gRPC API (default 8500, TF Serving's "
                             "gRPC port; 0: no gRPC API)")
    parser.add_argument("--host", type=_host, default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; "
                             "0.0.0.0 exposes it to the network)")
    parser.add_argument("--max-body-mb", type=flags.positive(float, most=4096),
                        default=DEFAULT_MAX_BODY_MB,
                        help=f"larger request bodies get HTTP 413, larger gRPC "
                             f"messages RESOURCE_EXHAUSTED (default "
                             f"{DEFAULT_MAX_BODY_MB:g}; MB = 2**20 bytes)")
    parser.add_argument("--poll-seconds", type=flags.positive(float, most=DAY),
                        default=1.0,
                        help="how often the base path is checked for a new version "
                             "(default 1, as TF Serving)")
    parser.add_argument("--threads", type=flags.positive(int, most=1024),
                        default=DEFAULT_THREADS,
                        help=f"requests handled at the same time, per API "
                             f"(default {DEFAULT_THREADS})")
    parser.add_argument("--settle-seconds", type=flags.positive(float, most=DAY),
                        default=DEFAULT_SETTLE_SECONDS,
                        help="a new version is loaded once its files have not "
                             "changed for this long, so a slow copy is not loaded "
                             f"half-written (default {DEFAULT_SETTLE_SECONDS:g})")
    parser.add_argument("--version-labels", type=_labels, default={},
                        metavar="LABEL=VERSION,...",
                        help="names for versions, e.g. stable=2,canary=3: "
                             "/labels/stable reaches version 2, and the labelled "
                             "versions stay loaded beside the latest")
    parser.add_argument("--enable-cors", action="store_true",
                        help="add CORS headers (Access-Control-Allow-Origin: *) to "
                             "REST responses and answer OPTIONS preflights, as TF "
                             "Serving's --rest_api_enable_cors_support")
    parser.add_argument("--enable-batching", action="store_true",
                        help="merge concurrent predictions (REST and gRPC) into "
                             "batches, as TF Serving's --enable_batching")
    parser.add_argument("--batching-parameters-file", metavar="FILE",
                        help="TF Serving's BatchingParameters in protobuf text "
                             "format (max_batch_size, batch_timeout_micros, "
                             "max_enqueued_batches, num_batch_threads, "
                             "allowed_batch_sizes, ...), as its "
                             "--batching_parameters_file; with --enable-batching")
    parser.add_argument("--rest-api-timeout-in-ms", type=flags.number(
                            int, 0, 24 * 3600 * 1000), default=DEFAULT_TIMEOUT_MS,
                        metavar="MS",
                        help="a REST prediction not answered within this time gets "
                             f"HTTP 504 (default {DEFAULT_TIMEOUT_MS}, as TF "
                             "Serving's --rest_api_timeout_in_ms; 0: no limit)")
    parser.add_argument("--monitoring-config-file", metavar="FILE",
                        help="TF Serving's MonitoringConfig in protobuf text format: "
                             "prometheus_config { enable, path } (default: metrics "
                             "at /monitoring/prometheus/metrics)")
    return parser


def _bind(flag: str, host: str, port: int,
          make: Callable[[], AnyServer]) -> AnyServer:
    """`make()`, the server; an address it cannot bind is the user's error."""
    try:
        return make()
    except OSError as e:
        cause = e.strerror or e.__cause__ or e
        raise errors.UserError(f"cannot listen on {host}:{port} ({cause}); pass "
                               f"another {flag} or --host.") from None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until Ctrl-C or SIGTERM: exit code 0, or 1/2 (a user's error, one line)."""
    args = build_parser().parse_args(argv)
    runtime.start()  # before TensorFlow loads
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C and SIGTERM stop the server, even where a shell started it in
        # the background with SIGINT ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _interrupt)
    repository = ModelRepository(args.model_base_path, args.model_name, freeze_gc=True,
                                 labels=args.version_labels,
                                 settle_seconds=args.settle_seconds)
    try:
        _serve(args, repository)
    except errors.UserError as e:
        return errors.report(e)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return errors.EXIT_INTERRUPTED
    finally:
        repository.stop()
    print("Stopped.", file=sys.stderr, flush=True)
    return 0


def _metrics_path(path: str | None) -> str | None:
    """Where the Prometheus page is served: TF Serving's default path, or what a
    --monitoring-config-file says (None: `enable: false`, no page)."""
    from stl10_keras.serving.metrics import METRICS_PATH
    from stl10_keras.serving.protos import monitoring_config_class, read_text_proto

    if path is None:
        return METRICS_PATH
    config = read_text_proto(path, monitoring_config_class(),
                             "--monitoring-config-file").prometheus_config
    if not config.enable:
        return None
    if config.path and not config.path.startswith("/"):
        raise errors.UsageError(f"--monitoring-config-file {path}: the path "
                                f"'{config.path}' must start with '/'.")
    return config.path or METRICS_PATH


def _batching_options(args: argparse.Namespace):
    """The `BatchingOptions` of --enable-batching (and its file), or None."""
    from stl10_keras.serving.batching import BatchingOptions, read_batching_parameters

    if not args.enable_batching:
        if args.batching_parameters_file:
            print("warning: --batching-parameters-file is ignored without "
                  "--enable-batching (as in TF Serving).", file=sys.stderr,
                  flush=True)
        return None
    if args.batching_parameters_file:
        return read_batching_parameters(args.batching_parameters_file)
    return BatchingOptions()


def _serve(args: argparse.Namespace, repository: ModelRepository) -> None:
    """Start the repository and both front ends; serve until Ctrl-C."""
    from stl10_keras.serving.metrics import ServingMetrics

    if not re.fullmatch(r"[^/:]+", repository.name):
        # TF Serving's URL cannot address it: /v1/models/NAME ends at '/' or ':'.
        raise errors.UsageError(
            f"the model name '{repository.name}' holds '/' or ':', so no URL can "
            "address it; pass a --model-name without them.")
    # Config files are read before the model loads: a typo fails at once.
    metrics_path = _metrics_path(args.monitoring_config_file)
    options = _batching_options(args)
    # A missing or empty base path fails here, before TensorFlow is loaded.
    servable = repository.start()
    max_bytes = int(args.max_body_mb * 2**20)
    metrics = ServingMetrics()
    with contextlib.ExitStack() as servers:
        from stl10_keras.serving.batching import Batcher, DirectRunner

        runner = DirectRunner() if options is None else Batcher(options, metrics)
        servers.callback(runner.stop)  # after both front ends have stopped
        rest = servers.enter_context(_bind(
            "--port", args.host, args.port,
            lambda: ModelServer(repository, args.host, args.port, args.threads,
                                max_bytes, enable_cors=args.enable_cors,
                                runner=runner, metrics=metrics,
                                timeout_ms=args.rest_api_timeout_in_ms,
                                metrics_path=metrics_path)))
        grpc_text = ""
        if args.grpc_port:
            from stl10_keras.serving.grpc import GrpcServer

            grpc_server = servers.enter_context(_bind(
                "--grpc-port", args.host, args.grpc_port,
                lambda: GrpcServer(repository, args.host, args.grpc_port,
                                   args.threads, max_bytes, runner, metrics)))
            grpc_text = f"; gRPC at {grpc_server.address}"
        if options is not None:
            print(f"Batching: max_batch_size {options.max_batch_size}, "
                  f"batch_timeout_micros {options.batch_timeout_micros}, "
                  f"max_enqueued_batches {options.max_enqueued_batches}, "
                  f"num_batch_threads {options.num_batch_threads}.",
                  file=sys.stderr, flush=True)
        for label, version in sorted(repository.labels.items()):
            if version not in repository.loaded_versions():
                print(f"warning: label '{label}' names version {version}, which is "
                      "not loaded; requests for it get 404 until it loads.",
                      file=sys.stderr, flush=True)
        repository.start_polling(args.poll_seconds)
        print(f"Serving model '{repository.name}' version {servable.version} "
              f"({servable.path}) at {rest.url}/v1/models/{repository.name}"
              f"{grpc_text}; Ctrl-C stops.", flush=True)
        try:
            rest.wait()
        except KeyboardInterrupt:
            pass  # Ctrl-C or SIGTERM: how a server is meant to stop
