"""SQLite backend: the embedded default, one node (several processes may share the file).

Durability: WAL journal with synchronous=FULL, so a transaction is on disk (the WAL is fsynced) when
COMMIT returns; an acknowledged event survives a crash of the process or the machine.

Order: every append runs in a `BEGIN IMMEDIATE` transaction, which takes the database's single write
lock before reading anything, so appends from all threads and processes are serialised; seqs are
allocated as max(seq)+1 inside it, so they commit in increasing order and a reader's snapshot always
holds a prefix of the log. Readers use their own connection: in WAL mode they never block the writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from loopserve.errors import FailedPrecondition
from loopserve.feedback_log.records import RecordType
from loopserve.feedback_log.sql import COLUMNS_OF, SCHEMA_VERSION, Row, SqlFeedbackLog

_IN = "IN (SELECT value FROM json_each(?))"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    type TEXT NOT NULL CHECK (type IN ('decision', 'feedback')),
    kind TEXT NOT NULL,
    decision_id TEXT UNIQUE,
    idempotency_key TEXT UNIQUE,
    event_id TEXT,
    chosen_event_id TEXT,
    rejected_event_id TEXT,
    task TEXT,
    model TEXT,
    model_version TEXT,
    needs_review INTEGER,
    created REAL NOT NULL,
    body TEXT NOT NULL,
    CHECK ((type = 'decision') = (decision_id IS NOT NULL)),
    CHECK ((type = 'feedback') = (idempotency_key IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS records_event_id ON records (event_id) WHERE event_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS records_chosen_event_id ON records (chosen_event_id)
    WHERE chosen_event_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS records_rejected_event_id ON records (rejected_event_id)
    WHERE rejected_event_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');
"""


def _private(path: Path) -> None:
    """The log holds every user text: create it readable by its owner only (0600), and tighten a file
    an older build created 0644. SQLite gives its -wal and -shm files the database file's mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        if path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
            for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(p, 0o600)


class SqliteFeedbackLog(SqlFeedbackLog):
    """The log in one SQLite file (created if missing)."""

    SELECT_KEY_SEQS = f"SELECT idempotency_key, seq, body FROM records WHERE idempotency_key {_IN}"
    SELECT_DECISION_IDS = f"SELECT decision_id FROM records WHERE decision_id {_IN}"
    SELECT_DECISION_BODIES = f"SELECT body FROM records WHERE decision_id {_IN}"
    SELECT_AFTER = "SELECT seq, type, body FROM records WHERE seq > ? ORDER BY seq LIMIT ?"
    SELECT_FEEDBACK_ON = (
        "SELECT body FROM records WHERE type = 'feedback' AND "
        f"(event_id {_IN} OR chosen_event_id {_IN} OR rejected_event_id {_IN}) ORDER BY seq"
    )
    INSERT = {
        record_type: f"INSERT INTO records ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        for record_type, cols in COLUMNS_OF.items()
    }

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _private(self.path)
        self._busy_timeout_s = busy_timeout_s
        # One connection for appends and one for reads, each behind its own lock: sqlite3 connections
        # must not run two statements at once, and WAL lets the reader work while the writer commits.
        self._write_conn = self._connect()
        self._read_conn = self._connect()
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._closed = False
        with self._write_lock:
            self._write_conn.executescript(f"BEGIN IMMEDIATE;{SCHEMA}COMMIT;")
            (version,) = self._write_conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if int(version) != SCHEMA_VERSION:
            raise FailedPrecondition(
                f"feedback log {self.path} has schema version {version}; this build reads {SCHEMA_VERSION}"
            )

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (the module's implicit transactions
        # would otherwise start a deferred one, which can deadlock two writers).
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False)
        (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
        if str(mode).lower() != "wal":
            conn.close()
            raise FailedPrecondition(f"cannot put {self.path} in WAL mode (got {mode!r}); use a local disk")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def __repr__(self) -> str:
        return f"SqliteFeedbackLog({str(self.path)!r})"

    @contextlib.contextmanager
    def _write_tx(self) -> Iterator[sqlite3.Cursor]:
        with self._write_lock:
            self._check_open()
            conn = self._write_conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn.cursor()
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def _read_tx(self) -> Iterator[sqlite3.Cursor]:
        with self._read_lock:
            self._check_open()
            conn = self._read_conn
            conn.execute("BEGIN")
            try:
                yield conn.cursor()
            finally:
                conn.execute("COMMIT")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")

    def _next_seqs(self, cur: Any, n: int) -> list[int]:
        # Safe under BEGIN IMMEDIATE: nobody else can append until we commit. Max of an INTEGER PRIMARY
        # KEY is a single b-tree lookup, and the log never deletes, so seqs are never reused.
        (top,) = cur.execute("SELECT coalesce(max(seq), 0) FROM records").fetchone()
        return list(range(top + 1, top + 1 + n))

    def _insert_rows(self, cur: Any, record_type: RecordType, rows: list[Row]) -> None:
        cur.executemany(self.INSERT[record_type], rows)

    def _list_param(self, values: Sequence[str]) -> Any:
        return json.dumps(list(values))

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            if self._closed:
                return
            self._closed = True
            self._read_conn.close()
            self._write_conn.close()
