"""Domain errors. Runtimes and stores raise these; one interceptor maps them to gRPC status codes
(loopserve/serving/interceptors.py), so servicers never call abort inline and runtimes never import grpc."""

from __future__ import annotations

MAX_MESSAGE_CHARS = 1024
"""Longest status message a server sends: far under gRPC's metadata limits, long enough to act on."""
QUOTE_CHARS = 40
"""Longest prefix of a client's string quoted back in a message."""


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """A client's string as a message may quote it: repr of at most `limit` characters, and the full
    length when cut. Error messages echo what the client sent, never all of it."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def cap_message(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 20] + f"... ({len(message)} chars)"


class LoopserveError(Exception):
    """Base class. `code` is the name of the gRPC status code it maps to."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        message = cap_message(message)
        super().__init__(message)
        self.message = message


class InvalidArgument(LoopserveError):
    """The request is malformed: empty or oversize text, unknown label, NaN, a limit exceeded."""

    code = "INVALID_ARGUMENT"


class NotFoundError(LoopserveError):
    """An unknown event_id, model or version."""

    code = "NOT_FOUND"


class FailedPrecondition(LoopserveError):
    """The request is well formed but does not fit the state (e.g. feedback kind vs event kind)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(LoopserveError):
    """A bounded queue is full: back off and retry."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(LoopserveError):
    """Not ready yet, or draining."""

    code = "UNAVAILABLE"


class DeadlineExceeded(LoopserveError):
    code = "DEADLINE_EXCEEDED"


class Unauthenticated(LoopserveError):
    code = "UNAUTHENTICATED"


class PermissionDenied(LoopserveError):
    code = "PERMISSION_DENIED"


class ModelFault(LoopserveError):
    """The served model produced a non-finite output: the server's fault, not the request's."""

    code = "INTERNAL"


class VerificationError(LoopserveError):
    """A model version failed verification (checksum, missing tensor, wrong shape, non-finite output)."""

    code = "FAILED_PRECONDITION"
