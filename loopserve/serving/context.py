"""What servicers may read from a call's context, without touching its status."""

from __future__ import annotations

from grpc import aio


def client_id(context: aio.ServicerContext) -> str:
    """The caller's self-declared id (metadata `x-client-id`), for the decision log; "" if absent."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-client-id" and isinstance(value, str):
            return value[:128]
    return ""
