"""`python -m stl10_keras.serve`: TF Serving's REST API for a SavedModel base path.

Serves `saved_models/NAME/` (TF Serving's layout, `NAME/VERSION/`) so that a TF
Serving client works unchanged:

    GET  /v1/models/NAME[/versions/V]            version status
    GET  /v1/models/NAME[/versions/V]/metadata   signature defs
    POST /v1/models/NAME[/versions/V]:predict    {"instances": ...} or {"inputs": ...}

Binary values are sent as `{"b64": "..."}` (the `serving_bytes` signature's
`image_bytes`). The highest version that loads is served; a poller picks up a
newly pushed version without a restart. Every error is `{"error": "<sentence>"}`
with a 4xx status when the client can fix it.

The HTTP layer is a Flask app on waitress (a threaded, production WSGI server);
the request handling (`ModelRepository`, `predict`) has no HTTP in it.
"""

import sys

from stl10_keras.serving.cli import build_parser, main
from stl10_keras.serving.codec import predict
from stl10_keras.serving.errors import NoVersionError, RequestError
from stl10_keras.serving.repository import ModelRepository, Servable, load_servable
from stl10_keras.serving.rest import ModelServer, make_app

__all__ = ["ModelRepository", "ModelServer", "NoVersionError", "RequestError",
           "Servable", "build_parser", "load_servable", "main", "make_app", "predict"]

if __name__ == "__main__":
    sys.exit(main())
