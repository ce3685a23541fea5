"""Asking the trainer for a round now (Label Studio's "Start training", `/train`), without waiting
for `round_min_events` or `round_interval_s`.

A request is a small file `<trainer-dir>/round_requests/<model>.json` (mode 0600, written to a temporary
name and renamed into place). Writing it needs write access to the data dir, which is the trainer's own
authentication; the HTTP adapter writes it only for a caller holding an annotator token. The trainer
looks for requests on each poll, runs the model's round even if it is not due, then removes the file.
Requests for the same model coalesce: asking twice before the round starts runs one round.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

REQUESTS_DIR = "round_requests"
_MODEL = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


def _folder(trainer_dir: Path) -> Path:
    return trainer_dir / REQUESTS_DIR


def request_round(trainer_dir: Path, model: str, source: str) -> Path:
    """Ask for a round of `model`; `source` says who asked (ids only, no user text)."""
    if not _MODEL.match(model):
        raise ValueError(f"not a model name: {model[:64]!r}")
    folder = _folder(trainer_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{model}.json"
    tmp = folder / f".{model}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"model": model, "source": source[:200], "time": time.time()}, f)
    tmp.replace(path)
    return path


def pending_rounds(trainer_dir: Path) -> set[str]:
    """Models with a round requested and not yet run."""
    folder = _folder(trainer_dir)
    if not folder.is_dir():
        return set()
    return {p.stem for p in folder.glob("*.json") if _MODEL.match(p.stem)}


def clear_round_request(trainer_dir: Path, model: str) -> None:
    (_folder(trainer_dir) / f"{model}.json").unlink(missing_ok=True)
