"""`python -m stl10_keras.serve`: the command line of the model server."""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sys
import threading
from typing import Any, Callable, Sequence

from stl10_keras.serving.errors import NoVersionError
from stl10_keras.serving.repository import ModelRepository
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stl10_keras.serve",
        description="Serve a SavedModel base path with TF Serving's REST API "
                    "(status, metadata, :predict); the highest version is served "
                    "and newly exported versions are picked up while running.")
    parser.add_argument("--model-base-path", required=True,
                        help="the model base path, saved_models/NAME (holds 1/, "
                             "2/, ...)")
    parser.add_argument("--model-name", default=None,
                        help="the NAME in /v1/models/NAME (default: the base path's "
                             "folder name)")
    parser.add_argument("--port", type=_port, default=8501,
                        help="TCP port (default 8501, TF Serving's REST port; 0: any "
                             "free port)")
    parser.add_argument("--host", type=_host, default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; "
                             "0.0.0.0 exposes it to the network)")
    parser.add_argument("--max-body-mb", type=_positive(float, most=4096),
                        default=DEFAULT_MAX_BODY_MB,
                        help=f"larger request bodies get HTTP 413 (default "
                             f"{DEFAULT_MAX_BODY_MB:g}; MB = 2**20 bytes)")
    parser.add_argument("--poll-seconds", type=_positive(float), default=1.0,
                        help="how often the base path is checked for a new version "
                             "(default 1, as TF Serving)")
    parser.add_argument("--threads", type=_positive(int, most=1024),
                        default=DEFAULT_THREADS,
                        help=f"requests handled at the same time (default "
                             f"{DEFAULT_THREADS})")
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C and SIGTERM stop the server, even where a shell started it in
        # the background with SIGINT ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _interrupt)
    repository = ModelRepository(args.model_base_path, args.model_name, freeze_gc=True)
    if not re.fullmatch(r"[^/:]+", repository.name):
        # TF Serving's URL cannot address it: /v1/models/NAME ends at '/' or ':'.
        print(f"error: the model name '{repository.name}' holds '/' or ':', so no URL "
              "can address it; pass a --model-name without them.", file=sys.stderr)
        return 2
    try:
        # A missing or empty base path fails here, before TensorFlow is loaded.
        servable = repository.start()
        try:
            server = ModelServer(repository, args.host, args.port, args.threads,
                                 int(args.max_body_mb * 2**20))
        except OSError as e:
            print(f"error: cannot listen on {args.host}:{args.port} "
                  f"({e.strerror or e}); pass another --port or --host.",
                  file=sys.stderr)
            return 1
        repository.start_polling(args.poll_seconds)
        print(f"Serving model '{repository.name}' version {servable.version} "
              f"({servable.path}) at {server.url}/v1/models/{repository.name}; "
              "Ctrl-C stops.", flush=True)
        server.run()  # returns on Ctrl-C (waitress catches KeyboardInterrupt)
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
