"""The Label Studio adapter on a real loopback HTTP port (uvicorn), in the test's event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import uvicorn

from loopserve.auth import load_tokens
from loopserve.labelstudio.backend import MLBackend
from loopserve.labelstudio.config import MLBackendConfig
from loopserve.labelstudio.http_app import create_app


@dataclass
class RunningAdapter:
    backend: MLBackend
    url: str


@asynccontextmanager
async def serve_adapter(cfg: MLBackendConfig) -> AsyncIterator[RunningAdapter]:
    table = load_tokens(cfg.token_path) if cfg.auth else None
    backend = MLBackend(cfg, table)
    server = uvicorn.Server(
        uvicorn.Config(create_app(backend), host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    )
    task = asyncio.get_running_loop().create_task(server.serve())
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    if not server.started:
        task.result()  # raises what stopped it
        raise RuntimeError("the adapter did not start")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield RunningAdapter(backend, f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        await task
