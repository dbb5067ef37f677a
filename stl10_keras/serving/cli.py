"""`python -m stl10_keras.serve`: the command line of the model server."""

from __future__ import annotations

import argparse
import re
import signal
import socket
import sys
import threading
from typing import Any, Callable, Sequence

from stl10_keras import runtime
from stl10_keras.serving.errors import NoVersionError
from stl10_keras.serving.repository import DEFAULT_SETTLE_SECONDS, ModelRepository
from stl10_keras.serving.rest import DEFAULT_MAX_BODY_MB, DEFAULT_THREADS, ModelServer


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
    parser = argparse.ArgumentParser(
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
    parser.add_argument("--port", type=_port, default=8501,
                        help="TCP port (default 8501, TF Serving's REST port; 0: any "
                             "free port)")
    parser.add_argument("--grpc-port", type=_port, default=8500,
                        help="TCP port of the gRPC API (default 8500, TF Serving's "
                             "gRPC port; 0: no gRPC API)")
    parser.add_argument("--host", type=_host, default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; "
                             "0.0.0.0 exposes it to the network)")
    parser.add_argument("--max-body-mb", type=_positive(float, most=4096),
                        default=DEFAULT_MAX_BODY_MB,
                        help=f"larger request bodies get HTTP 413, larger gRPC "
                             f"messages RESOURCE_EXHAUSTED (default "
                             f"{DEFAULT_MAX_BODY_MB:g}; MB = 2**20 bytes)")
    parser.add_argument("--poll-seconds", type=_positive(float), default=1.0,
                        help="how often the base path is checked for a new version "
                             "(default 1, as TF Serving)")
    parser.add_argument("--threads", type=_positive(int, most=1024),
                        default=DEFAULT_THREADS,
                        help=f"requests handled at the same time, per API "
                             f"(default {DEFAULT_THREADS})")
    parser.add_argument("--settle-seconds", type=_positive(float),
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
    return parser


def _cannot_listen(host: str, port: int, flag: str, error: OSError) -> int:
    cause = error.strerror or error.__cause__ or error
    print(f"error: cannot listen on {host}:{port} ({cause}); pass another {flag} "
          "or --host.", file=sys.stderr)
    return 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
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
    if not re.fullmatch(r"[^/:]+", repository.name):
        # TF Serving's URL cannot address it: /v1/models/NAME ends at '/' or ':'.
        print(f"error: the model name '{repository.name}' holds '/' or ':', so no URL "
              "can address it; pass a --model-name without them.", file=sys.stderr)
        return 2
    try:
        # A missing or empty base path fails here, before TensorFlow is loaded.
        servable = repository.start()
        max_bytes = int(args.max_body_mb * 2**20)
        try:
            server = ModelServer(repository, args.host, args.port, args.threads,
                                 max_bytes, enable_cors=args.enable_cors)
        except OSError as e:
            return _cannot_listen(args.host, args.port, "--port", e)
        grpc_server = None
        if args.grpc_port:
            from stl10_keras.serving.grpc import GrpcServer

            try:
                grpc_server = GrpcServer(repository, args.host, args.grpc_port,
                                         args.threads, max_bytes)
            except OSError as e:
                server.close()
                return _cannot_listen(args.host, args.grpc_port, "--grpc-port", e)
            grpc_server.start()
        for label, version in sorted(repository.labels.items()):
            if version not in repository.loaded_versions():
                print(f"warning: label '{label}' names version {version}, which is "
                      "not loaded; requests for it get 404 until it loads.",
                      file=sys.stderr, flush=True)
        repository.start_polling(args.poll_seconds)
        grpc_text = (f"; gRPC at {grpc_server.address}" if grpc_server else "")
        print(f"Serving model '{repository.name}' version {servable.version} "
              f"({servable.path}) at {server.url}/v1/models/{repository.name}"
              f"{grpc_text}; Ctrl-C stops.", flush=True)
        try:
            server.run()  # returns on Ctrl-C (waitress catches KeyboardInterrupt)
        finally:
            if grpc_server is not None:
                grpc_server.stop()
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
