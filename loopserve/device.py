"""Device and dtype selection: CUDA when present (bf16 there), else CPU (fp32, threads = cores)."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is visible")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r} (auto | cpu | cuda)")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r} (auto | float32 | bfloat16)")
    return table[name]


def cores_available() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def configure_threads(threads: int = 0) -> int:
    """Torch intra-op threads = the cores this process may use (a container's CPU set, not the host's)."""
    n = threads or cores_available()
    torch.set_num_threads(n)
    return n
