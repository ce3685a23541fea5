"""A real Label Studio server for tests, from its own virtual environment (`make label-studio-env`).

`label_studio_server()` starts it on a free loopback port with a throwaway SQLite database in a
temporary folder, a test user and an API token, and stops it (its whole process group) afterwards. The
database is a copy of the migrated, empty one that `make label-studio-env` builds (Label Studio's
migrations are most of a fresh start); without it, the server migrates a fresh one as it starts.
As with PostgreSQL, the one condition that skips instead of failing is a missing install: a machine
without Label Studio cannot run these tests, while one that has it and fails to start it has a bug.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from loopserve.ports import free_port
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
LS_VENV = Path(os.environ.get("LOOPSERVE_LS_VENV", REPO / ".venv-label-studio"))
LS_TEMPLATE = LS_VENV / "template" / "data"  # the migrated database (make label-studio-env)
START_TIMEOUT_S = 300.0  # a start that migrates a fresh database: ~50 s on 2 busy cores

# Loopback ML backends are what these tests connect: Label Studio blocks them by default (SSRF
# protection). Legacy tokens: the API token a test user gets with --user-token.
SERVER_ENV = {
    "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
    "SSRF_PROTECTION_ENABLED": "false",
    "ML_BLOCK_LOCAL_IP": "false",
    "COLLECT_ANALYTICS": "false",
    "LATEST_VERSION_CHECK": "false",
}


@dataclass(frozen=True)
class LabelStudioServer:
    url: str
    username: str
    password: str
    token: str
    log: Path


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_label_studio(folder: Path) -> tuple[subprocess.Popen[bytes], LabelStudioServer]:
    exe = LS_VENV / "bin" / "label-studio"
    if not exe.is_file():
        pytest.skip(f"Label Studio not installed in {LS_VENV} (make label-studio-env)")
    folder.mkdir(parents=True, exist_ok=True)
    if (LS_TEMPLATE.parent / ".migrated").is_file() and not (folder / "data").exists():  # built whole
        shutil.copytree(LS_TEMPLATE, folder / "data")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = LabelStudioServer(
        url, "annotator@example.com", secrets.token_hex(8), secrets.token_hex(20), folder / "ls.log"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPSERVE_", "VIRTUAL_ENV"))}
    env.update(SERVER_ENV, LABEL_STUDIO_BASE_DATA_DIR=str(folder / "data"))
    argv = [str(exe), "start", "--no-browser", "-p", str(port), "--host", url, "--internal-host", "127.0.0.1"]
    argv += ["--data-dir", str(folder / "data"), "--username", server.username, "--password", server.password]
    argv += ["--user-token", server.token]
    with server.log.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, server


def wait_healthy(proc: subprocess.Popen[bytes], server: LabelStudioServer, timeout_s: float = START_TIMEOUT_S) -> None:
    """Until Label Studio answers its health check; fails at once if the process exits first."""
    try:
        wait_until(
            lambda: proc.poll() is not None or _healthy(server.url), timeout_s, "Label Studio to start", interval_s=0.1
        )
    except AssertionError:
        pass
    if proc.poll() is not None or not _healthy(server.url):
        tail = server.log.read_text(errors="replace")[-3000:]
        stop(proc)
        raise AssertionError(f"Label Studio did not start (exit {proc.returncode}); its log ends:\n{tail}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@contextmanager
def label_studio_server(folder: Path) -> Iterator[LabelStudioServer]:
    proc, server = start_label_studio(folder)
    try:
        wait_healthy(proc, server)
        yield server
    finally:
        stop(proc)
