"""What every benchmark records and needs: the machine it ran on, free ports, a service process."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(**extra: Any) -> dict[str, Any]:
    """The CPU model, cores, platform and (where one is used) the GPU: figures differ between machines."""
    out: dict[str, Any] = {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        import torch

        out["torch"] = torch.__version__
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {**out, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_policy(data_dir: Path, port: int, metrics_port: int, flags: Sequence[str]) -> subprocess.Popen[bytes]:
    """`loopserve policy` in its own process, as a deployment runs it; quiet logs, no store polling."""
    argv = [
        sys.executable,
        "-m",
        "loopserve",
        "policy",
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--log-level",
        "WARNING",
        "--watch-interval-s",
        "60",
        *flags,
    ]
    return subprocess.Popen(argv, cwd=REPO)
