"""loopserve.heap in a service process: startup objects are frozen once the service serves."""

from __future__ import annotations

import asyncio
import gc
import os
import signal

import torch

from loopserve.config import ServerConfig
from loopserve.serving.server import serve_until_signalled


async def test_a_service_process_freezes_its_startup_objects_once_it_serves() -> None:
    seen: dict[str, int] = {}

    class App:  # what serve_until_signalled runs (a ServiceProcess), minus the servers
        async def start(self, watch: bool = True) -> int:
            seen["serving"] = gc.get_freeze_count()
            asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)  # then stop it
            return 0

        async def stop(self, grace_s: float | None = None) -> None:
            seen["stopping"] = gc.get_freeze_count()

    gc.unfreeze()
    loop = asyncio.get_running_loop()
    try:
        await serve_until_signalled(ServerConfig(metrics_port=-1, threads=torch.get_num_threads()), App)
    finally:
        gc.unfreeze()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    assert seen["serving"] == 0  # nothing frozen while the app starts (models load then)
    assert seen["stopping"] > 10_000  # every module, function and class alive once it serves
