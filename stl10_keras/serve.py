"""`python -m stl10_keras.serve`: TF Serving's REST and gRPC APIs for a SavedModel
base path (the code is in `stl10_keras.serving`; this is its one entry point).

Serves `saved_models/NAME/` (TF Serving's layout, `NAME/VERSION/`) so that a TF
Serving client works unchanged, over REST (`--port`, 8501):

    GET  /v1/models/NAME[/versions/V|/labels/L]            version status
    GET  /v1/models/NAME[/versions/V|/labels/L]/metadata   signature defs
    POST /v1/models/NAME[/versions/V|/labels/L]:predict    {"instances"} / {"inputs"}

and over gRPC (`--grpc-port`, 8500): `PredictionService` (Predict,
GetModelMetadata) and `ModelService.GetModelStatus`. The highest version that
loads is served; a poller picks up a newly pushed version without a restart.
`--enable-batching` merges concurrent predictions of both APIs into batches
(TF Serving's `--batching_parameters_file` format); Prometheus metrics are at
/monitoring/prometheus/metrics on the REST port.
A client's mistake gets a 4xx (or TF Serving's gRPC code) and one sentence.
See docs/serving.md.
"""

import sys

from stl10_keras.errors import NoVersionError
from stl10_keras.serving.cli import build_parser, main
from stl10_keras.serving.codec import predict
from stl10_keras.serving.errors import RequestError
from stl10_keras.serving.repository import ModelRepository, Servable, load_servable
from stl10_keras.serving.rest import ModelServer, make_app

__all__ = ["ModelRepository", "ModelServer", "NoVersionError", "RequestError",
           "Servable", "build_parser", "load_servable", "main", "make_app", "predict"]

if __name__ == "__main__":
    sys.exit(main())
