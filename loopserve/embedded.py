"""`loopserve up`: the embedded stack on one machine, as separate processes (each with its own GIL and
torch threads): the policy service, the reward service and the trainer, over one data dir (SQLite log,
local store, one token file). SIGINT/SIGTERM stops all of them with their drain grace.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from loopserve.auth import ensure_token_file
from loopserve.config import DEFAULT_REWARD_METRICS_PORT, DEFAULT_REWARD_PORT, PolicyConfig

logger = logging.getLogger(__name__)


def _common_flags(cfg: PolicyConfig) -> list[str]:
    flags = [
        "--data-dir",
        str(cfg.data_dir),
        "--device",
        cfg.device,
        "--dtype",
        cfg.dtype,
        "--log-level",
        cfg.log_level,
    ]
    if cfg.store_dir:
        flags += ["--store-dir", str(cfg.store_dir)]
    if cfg.log_url:
        flags += ["--log-url", cfg.log_url]
    return flags


def _server_flags(cfg: PolicyConfig) -> list[str]:
    flags = ["--host", cfg.host, "--grace-s", str(cfg.grace_s)]
    if cfg.no_auth:
        flags.append("--no-auth")
    if cfg.token_file:
        flags += ["--token-file", str(cfg.token_file)]
    return flags


def run_embedded(
    cfg: PolicyConfig,
    *,
    reward_port: int | None = None,
    reward_metrics_port: int | None = None,
    train: bool = True,
    ml_backend_port: int | None = None,
    label_studio_url: str = "",
) -> int:
    if not cfg.no_auth and cfg.token_file is None:
        ensure_token_file(cfg.token_path)
        print(f"tokens (client, annotator, admin roles): {cfg.token_path.resolve()}")
    exe = [sys.executable, "-m", "loopserve"]
    # Two services and a trainer share the cores: give each a fair share of torch threads.
    threads = str(max(1, (os.cpu_count() or 2) // 2))
    procs = {
        "policy": [
            *exe,
            "policy",
            "--port",
            str(cfg.port),
            "--metrics-port",
            str(cfg.metrics_port),
            "--threads",
            threads,
            *_common_flags(cfg),
            *_server_flags(cfg),
        ],
        "reward": [
            *exe,
            "reward",
            "--port",
            str(reward_port or DEFAULT_REWARD_PORT),
            "--metrics-port",
            str(reward_metrics_port or DEFAULT_REWARD_METRICS_PORT),
            "--threads",
            threads,
            *_common_flags(cfg),
            *_server_flags(cfg),
        ],
    }
    if train:
        procs["trainer"] = [
            *exe,
            "train",
            "--data-dir",
            str(cfg.data_dir),
            "--device",
            cfg.device,
            "--log-level",
            cfg.log_level,
            "--reward-target",
            f"127.0.0.1:{reward_port or DEFAULT_REWARD_PORT}",
            *(["--store-dir", str(cfg.store_dir)] if cfg.store_dir else []),
            *(["--log-url", cfg.log_url] if cfg.log_url else []),
        ]
    if ml_backend_port is not None:
        from loopserve.labelstudio.cli import ml_backend_flags

        procs["ml-backend"] = [
            *exe,
            "ml-backend",
            *ml_backend_flags(ml_backend_port, cfg.port, label_studio_url),
            "--data-dir",
            str(cfg.data_dir),
            "--log-level",
            cfg.log_level,
            "--host",
            cfg.host,
            *(["--no-auth"] if cfg.no_auth else []),
            *(["--token-file", str(cfg.token_file)] if cfg.token_file else []),
        ]
    running = {name: subprocess.Popen(argv) for name, argv in procs.items()}
    print(
        f"policy on {cfg.host}:{cfg.port} (metrics :{cfg.metrics_port}/metrics), "
        f"reward on {cfg.host}:{reward_port or DEFAULT_REWARD_PORT}"
        + (f", Label Studio ML backend on http://{cfg.host}:{ml_backend_port}" if ml_backend_port is not None else "")
        + "; Ctrl-C stops everything"
    )
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    while not stopping:
        for name, p in running.items():
            if p.poll() is not None:
                logger.error("%s exited with code %s; stopping the stack", name, p.returncode)
                code = p.returncode or 1
                stopping = True
        time.sleep(0.5)
    for p in running.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + cfg.grace_s + 5
    for p in running.values():
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
    return code
