"""Serving a SavedModel base path as TF Serving does (its REST API and, beside it,
its gRPC API), from one model repository.

    repository.py  the versions of a model base path: loading, polling, hot swap
    codec.py       a request -> tensors -> the signature -> a response (no transport)
    batching.py    server-side batching (TF Serving's BatchingParameters), bounded
                   queues, deadlines; the unbatched runner
    metrics.py     the Prometheus metrics, under TF Serving's names
    protos.py      TF Serving's config messages the tensorflow-serving-api lacks
    rest.py        TF Serving's REST API (Flask on waitress)
    grpc.py        TF Serving's gRPC PredictionService and ModelService
    server.py      the lifecycle both front ends share (start, wait, stop, `with`)
    cli.py         the command line, run by `python -m stl10_keras.serve`
    errors.py      RequestError (an HTTP status and its gRPC code)
"""
