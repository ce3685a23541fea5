"""The HTTP routes of Label Studio's ML backend protocol (FastAPI), over `MLBackend`.

Each route authenticates from the headers first, then reads the body (bounded by `max_body_bytes`),
then calls the backend and converts the answer. Domain errors become HTTP statuses here, in one place,
with the same short messages the gRPC services send; every call is counted and timed in the same
Prometheus collectors as gRPC calls (`service="labelstudio.MLBackend"`, the status as a gRPC code name).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from loopserve import metrics
from loopserve.errors import InvalidArgument, LoopserveError
from loopserve.labelstudio.backend import MLBackend, TooManyTasks
from loopserve.labelstudio.config import MLBackendConfig

logger = logging.getLogger(__name__)

SERVICE = "labelstudio.MLBackend"
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "FAILED_PRECONDITION": 409,
    "ALREADY_EXISTS": 409,
    "OUT_OF_RANGE": 400,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "UNIMPLEMENTED": 501,
}

Handler = Callable[[dict[str, Any], str | None], Awaitable[dict[str, Any]]]


class BodyTooLarge(LoopserveError):
    code = "RESOURCE_EXHAUSTED"


async def read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLarge(f"the request body is {declared} bytes; the limit is {max_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise BodyTooLarge(f"the request body is over the limit of {max_bytes} bytes")
    try:
        obj = json.loads(body or b"{}")
        # A lone surrogate (legal in JSON escapes) cannot be sent on: refuse it here, not halfway.
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeError):
        raise InvalidArgument("the request body is not valid JSON (UTF-8)") from None
    if not isinstance(obj, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return obj


def create_app(backend: MLBackend) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        try:
            yield
        finally:
            await backend.stop()

    app = FastAPI(title="loopserve ML backend for Label Studio", lifespan=lifespan, docs_url=None, redoc_url=None)
    max_bytes = backend.cfg.max_body_bytes

    async def call(method: str, request: Request, handler: Handler, ok_status: int = 200) -> Response:
        start = time.perf_counter()
        code = "OK"
        try:
            token = backend.authenticate(request.headers.get("authorization", ""))
            body = await read_json(request, max_bytes)
            return JSONResponse(await handler(body, token), status_code=ok_status)
        except LoopserveError as e:
            code = e.code
            status = 413 if isinstance(e, BodyTooLarge | TooManyTasks) else HTTP_STATUS.get(code, 500)
            headers = {"WWW-Authenticate": 'Basic realm="loopserve"'} if status == 401 else None
            return JSONResponse({"error": e.message, "code": code}, status_code=status, headers=headers)
        except Exception as e:
            code = "INTERNAL"
            incident = uuid.uuid4().hex[:12]
            # Type and incident only: messages can quote request data, which never goes to logs.
            logger.error("internal error %s in %s: %s", incident, method, type(e).__name__, exc_info=e)
            return JSONResponse(
                {"error": f"internal error (incident {incident}); the server logged the details", "code": code},
                status_code=500,
            )
        finally:
            metrics.REQUESTS.labels(SERVICE, method, code).inc()
            metrics.REQUEST_SECONDS.labels(SERVICE, method).observe(time.perf_counter() - start)

    @app.get("/health")
    @app.get("/")
    async def health() -> Response:
        try:
            info = await backend.model_info(backend.background_token())
        except LoopserveError as e:
            return JSONResponse({"status": "DOWN", "policy": e.code}, status_code=503)
        return JSONResponse({"status": "UP", "model_class": "loopserve", "model_version": info.annotator_version})

    @app.post("/setup")
    async def setup(request: Request) -> Response:
        return await call("setup", request, backend.setup)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        return await call("predict", request, backend.predict)

    @app.post("/webhook")
    async def webhook(request: Request) -> Response:
        return await call("webhook", request, backend.webhook, ok_status=201)

    @app.post("/train")
    async def train(request: Request) -> Response:
        return await call("train", request, backend.train, ok_status=201)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app


def run(cfg: MLBackendConfig) -> None:
    """Serve until SIGINT / SIGTERM (uvicorn handles both and drains open requests)."""
    import uvicorn

    from loopserve.auth import load_tokens

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per Label Studio call otherwise
    table = load_tokens(cfg.token_path) if cfg.auth else None
    if table is not None and not table.tokens:
        raise FileNotFoundError(f"no tokens in {cfg.token_path} or LOOPSERVE_TOKENS: every call would be refused")
    app = create_app(MLBackend(cfg, table))
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level.lower(), access_log=False)
