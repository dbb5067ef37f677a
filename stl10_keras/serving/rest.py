"""TF Serving's REST API over a `ModelRepository`: a Flask app on waitress."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
import traceback
from typing import Any

from stl10_keras.errors import one_line
from stl10_keras.serving.batching import Deadline, DirectRunner, Runner
from stl10_keras.serving.codec import parse_json, predict
from stl10_keras.serving.errors import RequestError, clip
from stl10_keras.serving.metrics import (
    METRICS_PATH,
    UNKNOWN,
    RequestRecord,
    ServingMetrics,
)
from stl10_keras.serving.repository import ModelRepository, parse_version
from stl10_keras.serving.server import JOIN_SECONDS, Server

DEFAULT_MAX_BODY_MB = 16.0
DEFAULT_THREADS = 8
#: TF Serving's `--rest_api_timeout_in_ms` default (30 s).
DEFAULT_TIMEOUT_MS = 30000
# TF Serving's REST routes (`http_rest_api_util.cc`): case-insensitive, and
# anything else under /v1/ is a 400 "Malformed request". A version is matched
# loosely here so that `parse_version` can say what is wrong with it.
_V1 = re.compile(r"/v1/.*", re.IGNORECASE | re.DOTALL)
_SPEC = (r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?")
_PREDICT = re.compile(r"/v1/models/(?P<name>[^/:]+)" + _SPEC + r":(?P<verb>[^/:]*)",
                      re.IGNORECASE | re.DOTALL)
_STATUS = re.compile(r"/v1/models(?:/(?P<name>[^/:]+))?" + _SPEC +
                     r"(?P<metadata>/metadata)?", re.IGNORECASE | re.DOTALL)
#: The headers of TF Serving's `--rest_api_enable_cors_support` (`AddCORSHeaders`).
CORS_HEADERS = {"Access-Control-Allow-Origin": "*",
                "Access-Control-Allow-Methods": "POST, GET",
                "Access-Control-Allow-Headers": "Content-Type"}


def _too_large(max_body_bytes: int) -> str:
    return (f"The request body is larger than this server's limit of "
            f"{max_body_bytes / 2**20:.4g} MB; send fewer instances per request or "
            "restart the server with a larger --max-body-mb.")


def _timed_out(timeout_ms: int) -> str:
    return (f"The request was not answered within this server's "
            f"--rest-api-timeout-in-ms of {timeout_ms} ms; send it again later or "
            "with fewer instances.")


def _status_of(error: BaseException) -> str:
    """The gRPC code name a REST answer counts under (TF Serving's labels)."""
    from werkzeug.exceptions import HTTPException

    if isinstance(error, RequestError):
        return error.grpc_code
    if isinstance(error, HTTPException):
        return "RESOURCE_EXHAUSTED" if error.code == 413 else "INVALID_ARGUMENT"
    return "INTERNAL"


def make_app(repository: ModelRepository, max_body_bytes: int,
             enable_cors: bool = False, runner: Runner | None = None,
             metrics: ServingMetrics | None = None,
             timeout_ms: int = DEFAULT_TIMEOUT_MS,
             metrics_path: str | None = METRICS_PATH):
    """The Flask app of TF Serving's REST API over `repository`.

    Args:
        repository: the started `ModelRepository`.
        max_body_bytes: larger request bodies get HTTP 413.
        enable_cors: add TF Serving's CORS headers to every response and answer
            an `OPTIONS` preflight (`--enable-cors`).
        runner: what computes predictions: a `Batcher` shared with the gRPC API,
            or a `DirectRunner` (the default).
        metrics: where requests are counted (a new `ServingMetrics` if None).
        timeout_ms: a prediction not answered within this many milliseconds
            gets 504 (`--rest-api-timeout-in-ms`; 0: no limit).
        metrics_path: where the Prometheus page is served (GET); None: nowhere.

    Returns:
        A `flask.Flask` WSGI app.
    """
    import flask
    from werkzeug.exceptions import HTTPException

    runner = runner or DirectRunner()
    metrics = metrics or ServingMetrics()

    app = flask.Flask("stl10_keras.serve")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.url_map.merge_slashes = False  # '//' is a malformed path, not a redirect
    name = repository.name
    api = (f"GET /v1/models/{name}[/versions/V|/labels/L][/metadata] and "
           f"POST /v1/models/{name}[/versions/V|/labels/L]:predict")

    def reply(payload: dict[str, Any], status: int = 200):
        return flask.Response(json.dumps(payload), status, mimetype="application/json")

    @app.errorhandler(RequestError)
    def request_error(e: RequestError):
        return reply({"error": e.message}, e.status)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        messages = {404: f"Unknown path; the API is {api}.",
                    413: _too_large(max_body_bytes)}
        status = e.code if e.code in messages else 400
        message = messages.get(status, f"{e.name}: {e.description}")
        return reply({"error": message}, status)

    @app.errorhandler(Exception)
    def internal_error(e: Exception):
        traceback.print_exc(file=sys.stderr)
        return reply({"error": f"Internal server error ({one_line(e)})."}, 500)

    if enable_cors:
        @app.after_request
        def add_cors_headers(response):
            response.headers.update(CORS_HEADERS)
            return response

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]

    @app.route("/", defaults={"path": ""}, methods=methods,
               provide_automatic_options=False, strict_slashes=False)
    @app.route("/<path:path>", methods=methods, provide_automatic_options=False,
               strict_slashes=False)
    def dispatch(path: str):
        path, method = flask.request.path, flask.request.method
        if path == metrics_path and method == "GET":
            page, content_type = metrics.exposition()
            return flask.Response(page, 200, content_type=content_type)
        if not _V1.fullmatch(path):
            raise RequestError(404, f"Unknown path '{clip(path, 80)}'; the API is "
                               f"{api}.")
        if enable_cors and method == "OPTIONS":
            return reply({})
        record = RequestRecord("REST")
        start = time.perf_counter()
        deadline = (Deadline(time.monotonic() + timeout_ms / 1000,
                             _timed_out(timeout_ms)) if timeout_ms else None)
        try:
            response = model_api(path, method, record, deadline)
        except Exception as e:
            metrics.record(record, _status_of(e), time.perf_counter() - start)
            raise
        metrics.record(record, "OK", time.perf_counter() - start)
        return response

    def model_api(path: str, method: str, record: RequestRecord,
                  deadline: Deadline | None):
        """A request under /v1/: status, metadata or predict."""
        route = {"POST": _PREDICT, "GET": _STATUS}.get(method)
        match = route.fullmatch(path) if route else None
        if match is None:
            raise RequestError(400, f"Malformed request: {method} {clip(path, 80)}; "
                               f"the API is {api}.")
        if not match["name"]:
            raise RequestError(400, "Missing model name in request; ask for "
                               f"/v1/models/{name}.")
        record.named(name, match["name"])
        if method == "GET":
            record.api = "GetModelMetadata" if match["metadata"] else "GetModelStatus"
        else:
            verb = match["verb"].lower()
            record.api = {"predict": "Predict", "classify": "Classify",
                          "regress": "Regress"}.get(verb, UNKNOWN)
        text = match["version"]
        version = None if text is None else parse_version(text)
        label = match["label"]
        repository.check_name(match["name"])
        if method == "GET":
            if match["metadata"]:
                return reply(repository.metadata(version, label))
            return reply(repository.status(version))  # a label is ignored, as in TF
        if verb in ("classify", "regress"):
            raise RequestError(400, f":{verb} needs a classification or regression "
                               "signature; this model has predict signatures, use "
                               ":predict.")
        if verb != "predict":
            raise RequestError(400, f"Malformed request: {method} {clip(path, 80)}; "
                               f"the API is {api}.")
        servable = repository.get(version, label)  # a bad URL first, whatever the body
        data = flask.request.get_data(cache=False)
        body = parse_json(data)
        if isinstance(body, dict):
            record.signed(servable.signatures, body.get("signature_name"))
        booleans = b"true" in data or b"false" in data
        try:
            return reply(predict(servable, body, booleans, runner, deadline))
        except RequestError as e:
            if e.status != 400:
                raise
        # A bad request is read again as `json` reads it (an integer beyond 64
        # bits stays an integer), so its sentence names the value as sent.
        return reply(predict(servable, parse_json(data, fast=False), booleans,
                             runner, deadline))

    return app


def _json_error_channel(max_body_bytes: int):
    """A waitress channel whose own error responses (413 before the body is read,
    malformed HTTP) are `{"error": ...}` JSON like the app's."""
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask

    class JSONErrorTask(ErrorTask):
        def execute(self):
            error = self.request.error
            message = (_too_large(max_body_bytes) if error.code == 413
                       else f"{error.reason}: {str(error.body).rstrip('.')}.")
            body = json.dumps({"error": message}).encode()
            self.status = f"{error.code} {error.reason}"
            self.response_headers.append(("Content-Type", "application/json"))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class JSONErrorChannel(HTTPChannel):
        error_task_class = JSONErrorTask

    return JSONErrorChannel


class ModelServer(Server):
    """TF Serving's REST API of a `ModelRepository` on waitress.

    Binds at construction (`port=0` picks a free port: see `.port`); started,
    waited for and stopped as every `Server`.

    Args:
        repository: the started `ModelRepository`.
        host: the address to bind; 127.0.0.1 keeps it off the network.
        port: the TCP port (0: any free one).
        threads: requests handled at the same time.
        max_body_bytes: larger request bodies get HTTP 413.
        enable_cors: TF Serving's CORS headers on every response.
        runner, metrics, timeout_ms, metrics_path: as `make_app` takes them.

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(self, repository: ModelRepository, host: str = "127.0.0.1",
                 port: int = 8501, threads: int = DEFAULT_THREADS,
                 max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20),
                 enable_cors: bool = False, runner: Runner | None = None,
                 metrics: ServingMetrics | None = None,
                 timeout_ms: int = DEFAULT_TIMEOUT_MS,
                 metrics_path: str | None = METRICS_PATH):
        from waitress.server import create_server

        # waitress warns "Task queue depth is N" whenever all threads are busy.
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
        self.repository = repository
        self._server = create_server(
            make_app(repository, max_body_bytes, enable_cors, runner, metrics,
                     timeout_ms, metrics_path), host=host, port=port,
            threads=threads,
            # Bodies up to 4x the limit are read (past 512 KB into a temp file)
            # and refused by Flask with a JSON 413: a client that sends its whole
            # body before reading the answer (urllib, requests) then gets it.
            # Larger ones waitress refuses from their headers, also as JSON, but
            # it closes the connection while such a client may still be sending.
            max_request_body_size=4 * max_body_bytes + 1,
            ident="stl10_keras.serve")
        self._server.channel_class = _json_error_channel(max_body_bytes)
        self._thread: threading.Thread | None = None
        listen = getattr(self._server, "effective_listen", None)
        if not listen:
            listen = [(self._server.effective_host, self._server.effective_port)]
        super().__init__(*listen[0])

    @property
    def url(self) -> str:
        """`http://host:port`, the root of the REST API."""
        return f"http://{self.address}"

    def start(self) -> None:
        """Serve in a background thread (waitress' loop; its threads answer)."""
        self._thread = threading.Thread(target=self._serve, name="rest",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            self._server.run()
        except Exception as e:
            # stop() can close a socket while the loop's select() still holds
            # its descriptor (EBADF); that is the shutdown asked for, not an
            # error (webtest's StopableWSGIServer does the same).
            if not (self._stopping and isinstance(e, OSError)):
                self._error = e
        finally:
            self._ended.set()

    def _shutdown(self, grace: float | None) -> None:
        from waitress import wasyncore

        server = self._server
        sockets = getattr(server, "_map", None) or server.map
        trigger = getattr(server, "trigger", None)
        serving = self._thread is not None and self._thread.is_alive()
        if trigger is not None and serving:
            # The loop owns its sockets: close them in its own thread.
            trigger.pull_trigger(lambda: wasyncore.close_all(sockets))
        else:
            wasyncore.close_all(sockets)
        # waitress has no graceful drain: its threads get `grace` to finish.
        server.task_dispatcher.shutdown(timeout=grace or 0)
        if self._thread is None:
            self._ended.set()
        else:
            self._thread.join(JOIN_SECONDS)
