"""TF Serving's gRPC API over a `ModelRepository`: PredictionService and ModelService.

Built on grpcio and the `tensorflow-serving-api` package's generated stubs, so a
client written for TF Serving (`prediction_service_pb2_grpc.PredictionServiceStub`,
`tf.make_tensor_proto`) works unchanged. Status codes are TF Serving's:
NOT_FOUND for an unknown model or version, INVALID_ARGUMENT for a bad request
(dtype, shape, undecodable image, unknown label or signature, Classify/Regress on
a predict-only model), RESOURCE_EXHAUSTED over the size limit, UNAVAILABLE when
the batching queue is full, DEADLINE_EXCEEDED for a request whose deadline
passed before it was computed (it is not computed). INTERNAL is kept for a bug
in this server; a client's mistake never gets it.
"""

from __future__ import annotations

import sys
import time
import traceback
from concurrent import futures
from typing import Callable

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from stl10_keras.errors import one_line
from stl10_keras.serving.batching import Deadline, DirectRunner, Runner
from stl10_keras.serving.codec import (
    input_dtype_name,
    protos_from_outputs,
    signature_of,
    tensor_from_proto,
)
from stl10_keras.serving.errors import RequestError, clip
from stl10_keras.serving.metrics import RequestRecord, ServingMetrics
from stl10_keras.serving.repository import ModelRepository, Servable
from stl10_keras.serving.server import JOIN_SECONDS, Server

SIGNATURE_DEF = "signature_def"  # GetModelMetadataImpl::kSignatureDef
#: grpcio's `time_remaining()` of a call without a deadline is about 10**9 s.
NO_DEADLINE_SECONDS = 1e8
#: The calls whose `model_spec` names a signature (the others have none).
_SIGNED = ("Predict", "Classify", "Regress")


def _answer(method: Callable) -> Callable:
    """Run a servicer method; a `RequestError` becomes its gRPC status code, and
    every call is counted in the servicer's metrics."""
    api = method.__name__

    def handler(self, request, context):
        record = RequestRecord("GRPC", api)
        start = time.perf_counter()
        status = "OK"
        try:
            spec = getattr(request, "model_spec", None)
            if spec is not None:
                record.named(self.repository.name, spec.name)
                if api in _SIGNED:
                    record.signed(self.repository.current.signatures,
                                  spec.signature_name)
            return method(self, request, context)
        except RequestError as e:
            status = e.grpc_code
            context.abort(getattr(grpc.StatusCode, e.grpc_code), e.message)
        except Exception as e:  # a bug here, not the client's: say so once
            status = "INTERNAL"
            traceback.print_exc(file=sys.stderr)
            context.abort(grpc.StatusCode.INTERNAL,
                          f"Internal server error ({one_line(e)}).")
        finally:
            self.metrics.record(record, status, time.perf_counter() - start)
    handler.__name__ = method.__name__
    handler.__doc__ = method.__doc__
    return handler


def _deadline(context) -> Deadline | None:
    """The call's gRPC deadline, if it has one."""
    remaining = context.time_remaining()
    if remaining is None or remaining > NO_DEADLINE_SECONDS:
        return None
    return Deadline(time.monotonic() + remaining,
                    "The call's deadline passed before it was computed; set a "
                    "longer timeout or send it again when the server is less busy.")


def _servable(repository: ModelRepository, model_spec) -> Servable:
    """The version a `ModelSpec` names (version, label, or the latest)."""
    repository.check_name(model_spec.name)
    choice = model_spec.WhichOneof("version_choice")
    if choice == "version":
        return repository.get(model_spec.version.value)
    if choice == "version_label":
        return repository.get(label=model_spec.version_label)
    return repository.get()


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """TF Serving's `PredictionService` for the predict signatures of a repository.

    Args:
        repository: the started `ModelRepository`.
        max_tensor_bytes: an input tensor larger than this is RESOURCE_EXHAUSTED.
        runner: what computes predictions (a `Batcher` shared with the REST
            API, or a `DirectRunner`).
        metrics: where calls are counted.
    """

    def __init__(self, repository: ModelRepository, max_tensor_bytes: int,
                 runner: Runner | None = None,
                 metrics: ServingMetrics | None = None):
        self.repository = repository
        self.max_tensor_bytes = max_tensor_bytes
        self.runner = runner or DirectRunner()
        self.metrics = metrics or ServingMetrics()

    @_answer
    def Predict(self, request, context):
        """Run a signature on `request.inputs`; `output_filter` picks outputs."""
        servable = _servable(self.repository, request.model_spec)
        signature, fn = signature_of(servable, request.model_spec.signature_name)
        specs = fn.structured_input_signature[1]
        if sorted(request.inputs) != sorted(specs):
            raise RequestError(400, f"The request's inputs are "
                               f"{sorted(clip(k) for k in request.inputs)}; "
                               f"signature '{signature}' takes {sorted(specs)}.")
        inputs = {
            name: tensor_from_proto(
                name, request.inputs[name], specs[name],
                input_dtype_name(servable, signature, name, specs[name]),
                self.max_tensor_bytes)
            for name in sorted(specs)}
        arrays = self.runner.run(signature, fn, inputs, False, _deadline(context))
        wanted = list(request.output_filter) or list(arrays)
        unknown = [k for k in wanted if k not in arrays]
        if unknown:
            raise RequestError(400, f"output_filter names {clip(unknown[0])!r}, not an "
                               f"output of signature '{signature}' "
                               f"({sorted(arrays)}).")
        response = predict_pb2.PredictResponse()
        self._model_spec(response.model_spec, servable, signature)
        for name, proto in protos_from_outputs(
                {k: arrays[k] for k in wanted}).items():
            response.outputs[name].CopyFrom(proto)
        return response

    @_answer
    def GetModelMetadata(self, request, context):
        """The signature defs (the only metadata field TF Serving has)."""
        if not request.metadata_field:
            raise RequestError(400, "GetModelMetadataRequest must specify at least "
                               f"one metadata_field; ask for '{SIGNATURE_DEF}'.")
        for field in request.metadata_field:
            if field != SIGNATURE_DEF:
                raise RequestError(400, f"Metadata field {clip(field)!r} is not "
                                   f"supported; ask for '{SIGNATURE_DEF}'.")
        servable = _servable(self.repository, request.model_spec)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        self._model_spec(response.model_spec, servable)
        response.metadata[SIGNATURE_DEF].Pack(servable.signature_def_map)
        return response

    def _predict_only(self, request, kind: str) -> None:
        servable = _servable(self.repository, request.model_spec)
        signature, _ = signature_of(servable, request.model_spec.signature_name)
        method = servable.signature_defs[signature]["method_name"]
        verb = {"classification": "classify", "regression": "regress"}[kind]
        raise RequestError(400, f"Expected {kind} signature method_name to be "
                           f"tensorflow/serving/{verb}. Was: {method}; this model has "
                           "predict signatures only, use Predict.")

    @_answer
    def Classify(self, request, context):
        """INVALID_ARGUMENT: the signatures are predict signatures (as TF Serving)."""
        self._predict_only(request, "classification")

    @_answer
    def Regress(self, request, context):
        """INVALID_ARGUMENT: the signatures are predict signatures (as TF Serving)."""
        self._predict_only(request, "regression")

    @_answer
    def MultiInference(self, request, context):
        """INVALID_ARGUMENT: it runs classify/regress signatures, which are absent."""
        for task in request.tasks:
            self._predict_only(task, "classification")
        raise RequestError(400, "MultiInference needs at least one task; this model "
                           "has predict signatures only, use Predict.")

    def _model_spec(self, spec, servable: Servable, signature: str | None = None):
        spec.name = self.repository.name
        spec.version.value = servable.version
        if signature is not None:
            spec.signature_name = signature


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """TF Serving's `ModelService.GetModelStatus` (HandleReloadConfigRequest is
    UNIMPLEMENTED: this server serves one model base path from its flags)."""

    def __init__(self, repository: ModelRepository,
                 metrics: ServingMetrics | None = None):
        self.repository = repository
        self.metrics = metrics or ServingMetrics()

    @_answer
    def GetModelStatus(self, request, context):
        """Every version tried, newest first, or the one `model_spec` names."""
        from tensorflow.core.protobuf import error_codes_pb2

        if not request.HasField("model_spec"):
            raise RequestError(400, "Missing ModelSpec; set model_spec.name to "
                               f"'{self.repository.name}'.")
        spec = request.model_spec
        if spec.name != self.repository.name:
            raise RequestError(404, f"Could not find any versions of model "
                               f"{clip(spec.name)!r}; this server serves "
                               f"'{self.repository.name}'.")
        version = spec.version.value if spec.HasField("version") else None
        response = get_model_status_pb2.GetModelStatusResponse()
        states = get_model_status_pb2.ModelVersionStatus.State
        for v, state, code, message in self.repository.version_states(version):
            status = response.model_version_status.add(
                version=v, state=states.Value(state))
            status.status.error_code = error_codes_pb2.Code.Value(code)
            status.status.error_message = message
        return response


class GrpcServer(Server):
    """TF Serving's gRPC API of a `ModelRepository` on grpcio.

    Binds at construction (`port=0` picks a free port: see `.port`); started,
    waited for and stopped as every `Server`.

    Args:
        repository: the started `ModelRepository`.
        host: the address to bind.
        port: the TCP port (0: any free one).
        threads: requests handled at the same time.
        max_message_bytes: larger requests get RESOURCE_EXHAUSTED (from grpcio).
        runner: what computes predictions (`Batcher` or `DirectRunner`).
        metrics: where calls are counted (shared with the REST API).

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(self, repository: ModelRepository, host: str = "127.0.0.1",
                 port: int = 8500, threads: int = 8,
                 max_message_bytes: int = 16 * 2**20,
                 runner: Runner | None = None,
                 metrics: ServingMetrics | None = None):
        self._server = grpc.server(
            futures.ThreadPoolExecutor(threads, thread_name_prefix="grpc"),
            options=[("grpc.max_receive_message_length", max_message_bytes),
                     ("grpc.max_send_message_length", -1),
                     # A port in use is an error, not a second listener.
                     ("grpc.so_reuseport", 0)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(repository, max_message_bytes, runner, metrics),
            self._server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(repository, metrics), self._server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = self._server.add_insecure_port(address)
        except RuntimeError as e:  # grpcio >= 1.x raises instead of returning 0
            raise OSError(f"cannot bind {address}") from e
        if not bound:
            raise OSError(f"cannot bind {address}")
        super().__init__(host, bound)

    def start(self) -> None:
        """Serve in grpcio's threads."""
        self._server.start()

    def _shutdown(self, grace: float | None) -> None:
        if self._server.stop(grace).wait((grace or 0) + JOIN_SECONDS):
            self._ended.set()
