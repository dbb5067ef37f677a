"""The errors a request or a model base path can end in, shared by both front ends."""

from __future__ import annotations

#: HTTP status -> the gRPC status code TF Serving answers for the same mistake
#: (its `ToHTTPStatusCode` in `model_servers/http_server.cc`, read backwards).
GRPC_CODES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED"}


class RequestError(Exception):
    """A request the server will not answer: an HTTP status and one sentence.

    Args:
        status: the HTTP status (400, 404, 413); the gRPC front end answers
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


class NoVersionError(Exception):
    """The model base path holds no version that loads; the message names the fix."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """The informative line of an exception (TensorFlow's span many lines)."""
    lines = [ln.strip() for ln in str(error).splitlines()]
    skip = ("Graph execution error", "Detected at node", "<stack traces", "[[")
    useful = [ln for ln in lines if ln and not ln.startswith(skip)]
    text = (useful[-1] if useful else type(error).__name__).rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = 40) -> str:
    """`text` for an error sentence: a huge URL part is shortened, not echoed whole."""
    if len(text) <= limit:
        return text
    return f"{text[:limit - 13]}... ({len(text):,} chars)"
