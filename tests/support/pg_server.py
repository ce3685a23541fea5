"""A throwaway PostgreSQL server for tests and benchmarks.

`postgres_server()` runs `initdb` in a fresh temporary directory, starts the server on a free loopback
port (fsync on, the unix socket inside the temporary directory so nothing touches /var/run), creates a
database and yields its ``postgresql://`` URL; on exit it stops the server and removes the directory.

PostgreSQL refuses to run as root, so when the tests run as root the server's commands run as the
``postgres`` OS user (``runuser -u postgres --``) and the directory is chowned to it; as any other user
they run as that user. The one condition that skips instead of failing is missing binaries: a machine
without PostgreSQL cannot run these tests, while a machine that has it and fails to start it has a bug
worth seeing.

Use it from a session-scoped fixture::

    @pytest.fixture(scope="session")
    def pg_url():
        with postgres_server() as url:
            yield url

`create_schema(url, name)` gives each test its own empty schema (a URL that selects it), and
`create_database(url, name)` its own database, on the same server.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from loopserve.ports import free_port

PG_VERSION = 15
# An explicit folder wins (e.g. a CI image with PostgreSQL elsewhere).
BINDIR = Path(os.environ.get("LOOPSERVE_PG_BINDIR", f"/usr/lib/postgresql/{PG_VERSION}/bin"))
_OS_USER = "postgres"
_START_TIMEOUT_S = 60


def _as_server_user(cmd: list[str]) -> list[str]:
    """Prefix `cmd` so it runs as the postgres OS user when we are root (initdb and postgres refuse root)."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", _OS_USER, "--", *cmd]


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{Path(cmd[-1]).name if cmd else cmd} failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"{proc.stdout}\n{proc.stderr}"
        )


def binaries_present() -> bool:
    return all((BINDIR / name).is_file() for name in ("initdb", "pg_ctl", "postgres"))


def create_database(url: str, name: str) -> str:
    """Create database `name` on the server behind `url`; return a URL for it."""
    import psycopg  # a test dependency; imported here so collecting tests never needs it

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


def create_schema(url: str, name: str) -> str:
    """Create schema `name` in the database behind `url`; return a URL whose sessions use it.

    Far cheaper than a database per test (a catalog row, not a copied template), which matters on a
    busy disk: the log's tables land in the schema through the session's search_path.
    """
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    parts = urllib.parse.urlsplit(url)
    query = [*urllib.parse.parse_qsl(parts.query), ("options", f"-csearch_path={name}")]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


@contextlib.contextmanager
def postgres_server(database: str = "loopserve") -> Iterator[str]:
    """Start a private PostgreSQL server, yield a URL to a fresh database, then stop and delete it."""
    if not binaries_present():
        pytest.skip(f"PostgreSQL {PG_VERSION} binaries not found in {BINDIR} (set LOOPSERVE_PG_BINDIR)")
    # /tmp keeps the unix socket path well under the 107-byte limit.
    root = Path(tempfile.mkdtemp(prefix="loopserve-pg-", dir="/tmp"))
    datadir = root / "data"
    logfile = root / "server.log"
    started = False
    try:
        if os.geteuid() == 0:
            pw = pwd.getpwnam(_OS_USER)
            os.chown(root, pw.pw_uid, pw.pw_gid)
        os.chmod(root, 0o700)
        _run(
            _as_server_user(
                [
                    str(BINDIR / "initdb"),
                    *("-D", str(datadir), "-U", "postgres", "--auth=trust"),
                    *("--encoding=UTF8", "--no-locale", "--no-instructions"),
                    # initdb's own fsync of the template files buys nothing for a throwaway server;
                    # the server itself runs with fsync on, so commits in tests are really durable.
                    "--no-sync",
                ]
            ),
            cwd=root,
        )
        port = free_port()
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-p {port}",
                f"-k {root}",
                "-c fsync=on",
                "-c synchronous_commit=on",
                "-c max_connections=60",
                "-c shared_buffers=64MB",
            ]
        )
        _run(
            _as_server_user(
                [
                    str(BINDIR / "pg_ctl"),
                    *("-D", str(datadir), "-l", str(logfile), "-o", options),
                    *("-w", "-t", str(_START_TIMEOUT_S), "start"),
                ]
            ),
            cwd=root,
        )
        started = True
        yield create_database(f"postgresql://postgres@127.0.0.1:{port}/postgres", database)
    finally:
        if started:
            subprocess.run(
                # immediate: skip the shutdown checkpoint (seconds of fsync on a busy disk); the data is
                # deleted next anyway.
                _as_server_user([str(BINDIR / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "-w", "stop"]),
                cwd=root,
                capture_output=True,
                check=False,
            )
        shutil.rmtree(root, ignore_errors=True)
