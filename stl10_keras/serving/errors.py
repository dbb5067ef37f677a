"""The errors a request can end in, shared by both front ends.

(A model base path that holds no version that loads is `stl10_keras.errors.
NoVersionError`, a user's error of the command.)
"""

from __future__ import annotations

#: HTTP status -> the gRPC status code TF Serving answers for the same case
#: (its `ToHTTPStatusCode` in `model_servers/http_server.cc`, read backwards):
#: 503 is a full batching queue or a stopping server (UNAVAILABLE), 504 a
#: request whose deadline passed before it was answered (DEADLINE_EXCEEDED).
GRPC_CODES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED",
              503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


class RequestError(Exception):
    """A request the server will not answer: an HTTP status and one sentence.

    Args:
        status: the HTTP status (400, 404, 413, 503, 504); the gRPC front end answers
            `GRPC_CODES[status]`.
        message: one sentence that names the fix.
    """

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def grpc_code(self) -> str:
        """The name of the `grpc.StatusCode` for this error."""
        return GRPC_CODES.get(self.status, "INVALID_ARGUMENT")


def clip(text: str, limit: int = 40) -> str:
    """`text` for an error sentence: a huge URL part is shortened, not echoed whole."""
    if len(text) <= limit:
        return text
    return f"{text[:limit - 13]}... ({len(text):,} chars)"
