"""The two grpc.aio server interceptors every loopserve server runs.

- `StatusInterceptor` (outermost): the one place where domain errors (loopserve.errors) become gRPC
  status codes, and where every RPC is counted and timed. Servicers never call abort themselves.
  It also guards parsing: a body that does not parse as its message type becomes INVALID_ARGUMENT
  with a short message (counted in `loopserve_malformed_requests`), never grpc's own UNKNOWN and a
  traceback in the log; inside a client stream, the bad message ends the stream the same way.
- `AuthInterceptor`: bearer token -> role, decided from the call's metadata before the request body is
  read: an unauthenticated call gets UNAUTHENTICATED / PERMISSION_DENIED and its body is never parsed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from loopserve import auth, metrics
from loopserve.errors import InvalidArgument, LoopserveError

logger = logging.getLogger(__name__)

Behaviour = Callable[..., Any]


def _split(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


def _rewrap(
    handler: grpc.RpcMethodHandler,
    wrap: Callable[[Behaviour, str], Behaviour],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A copy of `handler` whose behaviour is wrap(behaviour, kind) (and, if given, whose requests are
    read by `request_deserializer`)."""
    kw = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, "unary_unary"), **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, "unary_stream"), **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, "stream_unary"), **kw)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, "stream_stream"), **kw)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, LoopserveError):
        return grpc.StatusCode[exc.code], exc.message
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the work finished"
    incident = uuid.uuid4().hex[:12]
    # Type and incident id only: exception messages can carry request data, which never goes to logs.
    logger.error("internal error %s: %s", incident, type(exc).__name__, exc_info=(type(exc), exc, exc.__traceback__))
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident}); the server logged the details"


async def _responses(behaviour: Behaviour, request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
    """A streaming handler is either an async generator or a coroutine that writes with
    `context.write` (grpc's own health servicer's Watch): iterate the first, await the second."""
    result = behaviour(request, context)
    if inspect.isasyncgen(result):
        async for response in result:
            yield response
    else:
        await result


class Malformed:
    """What the guarded deserializer hands on in place of a body that did not parse."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _type_name(deserializer: Callable[[bytes], Any] | None) -> str:
    owner = getattr(deserializer, "__self__", None)  # `Message.FromString` is bound to its class
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "the request message"))


def _guarded(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer` that returns a `Malformed` instead of raising (grpc would log a traceback and
    answer UNKNOWN)."""
    if deserializer is None:
        return None
    type_name = _type_name(deserializer)

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception:
            return Malformed(type_name)

    return parse


def _malformed(service: str, method: str, request: Malformed) -> InvalidArgument:
    metrics.MALFORMED_REQUESTS.labels(service, method).inc()
    return InvalidArgument(f"the request body is not a valid {request.type_name} message")


async def _checked_stream(requests: AsyncIterator[Any], service: str, method: str) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Malformed):
            raise _malformed(service, method, request)
        yield request


class StatusInterceptor(aio.ServerInterceptor):
    """Maps exceptions to status codes; counts and times every RPC."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        service, method = _split(details.method)

        def finish(start: float, code: grpc.StatusCode) -> None:
            metrics.REQUESTS.labels(service, method, code.name).inc()
            metrics.REQUEST_SECONDS.labels(service, method).observe(time.perf_counter() - start)

        async def fail(context: aio.ServicerContext, exc: BaseException, start: float) -> None:
            code, message = status_of(exc)
            finish(start, code)
            await context.abort(code, message)

        def checked(request: Any, kind: str) -> Any:
            """The request as the servicer should see it: a malformed body raises InvalidArgument."""
            if kind.startswith("stream_"):
                return _checked_stream(request, service, method)
            if isinstance(request, Malformed):
                raise _malformed(service, method, request)
            return request

        def wrap(behaviour: Behaviour, kind: str) -> Behaviour:
            if kind in ("unary_stream", "stream_stream"):

                async def streaming(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                    start = time.perf_counter()
                    try:
                        async for response in _responses(behaviour, checked(request, kind), context):
                            yield response
                    except asyncio.CancelledError:
                        finish(start, grpc.StatusCode.CANCELLED)
                        raise
                    except aio.AbortError:
                        finish(start, context.code() or grpc.StatusCode.UNKNOWN)
                        raise
                    except Exception as exc:
                        await fail(context, exc, start)
                    else:
                        finish(start, grpc.StatusCode.OK)

                return streaming

            async def unary(request: Any, context: aio.ServicerContext) -> Any:
                start = time.perf_counter()
                try:
                    response = await behaviour(checked(request, kind), context)
                except asyncio.CancelledError:
                    finish(start, grpc.StatusCode.CANCELLED)
                    raise
                except aio.AbortError:
                    finish(start, context.code() or grpc.StatusCode.UNKNOWN)
                    raise
                except Exception as exc:
                    await fail(context, exc, start)
                finish(start, grpc.StatusCode.OK)
                return response

            return unary

        return _rewrap(handler, wrap, _guarded(handler.request_deserializer))


def _unread(raw: bytes) -> None:
    """The deserializer of a refused call: its body is never parsed."""
    return None


def _refusal(handler: grpc.RpcMethodHandler, error: LoopserveError) -> grpc.RpcMethodHandler:
    """A handler of the same kind that raises `error` without reading the request."""

    def wrap(behaviour: Behaviour, kind: str) -> Behaviour:
        if kind in ("unary_stream", "stream_stream"):

            async def streaming(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                raise error
                yield  # an async generator, like the behaviour it replaces

            return streaming

        async def unary(request: Any, context: aio.ServicerContext) -> Any:
            raise error

        return unary

    return _rewrap(handler, wrap, _unread)


class AuthInterceptor(aio.ServerInterceptor):
    """Checks the bearer token against the token table before the servicer runs."""

    def __init__(self, table: auth.TokenTable) -> None:
        self.table = table

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or auth.required_role(details.method) is None:
            return handler
        metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        try:  # decided on the metadata alone, before grpc reads the body
            auth.authorize(self.table, details.method, metadata)
        except LoopserveError as exc:
            return _refusal(handler, exc)
        return handler
