"""Domain errors. Runtimes and stores raise these; one interceptor maps them to gRPC status codes
(loopserve/interceptors.py), so servicers never call abort inline and runtimes never import grpc."""

from __future__ import annotations


class LoopserveError(Exception):
    """Base class. `code` is the name of the gRPC status code it maps to."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
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


class VerificationError(LoopserveError):
    """A model version failed verification (checksum, missing tensor, wrong shape, non-finite output)."""

    code = "FAILED_PRECONDITION"
