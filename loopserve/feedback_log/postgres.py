"""PostgreSQL backend: the log shared by several service replicas and the trainer.

Order, and why an advisory lock: a sequence hands out numbers at INSERT time but transactions commit
in any order, so with plain `nextval` a reader could see seq 11 committed while seq 10 is still in
flight, move its cursor past 10 and never read it. Each append therefore first takes a
transaction-level advisory lock (`pg_advisory_xact_lock`), shared by every process on the database,
and only then draws its seqs. PostgreSQL makes a transaction visible before it releases its locks, so
the next append draws larger seqs only after the previous one is visible: seqs become visible in
increasing order and every snapshot holds a prefix of the log. The cost is that appends do not
overlap, which group commit makes cheap (one lock per batch, not per event); the alternative, exposing
only seqs below the oldest in-flight transaction, needs the xmin horizon of other sessions and gives
the same order with more moving parts. Seqs may have gaps (a rolled-back append still consumes them).

Durability: the server's fsync and synchronous_commit (defaults: on) make COMMIT durable; we assume
them. Batches are written with COPY. Appends NOTIFY a channel in the same transaction (delivered at
commit) so that `follow` wakes up at once instead of waiting out its poll interval.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg

from loopserve.errors import FailedPrecondition
from loopserve.feedback_log.base import AppendWaiter
from loopserve.feedback_log.records import RecordType
from loopserve.feedback_log.sql import COLUMNS_OF, SCHEMA_VERSION, Row, SqlFeedbackLog

logger = logging.getLogger(__name__)

# Advisory locks and NOTIFY channels are per database, not per schema. The append lock and the
# channel are derived from the schema the log lives in (the session's current_schema), so that logs
# in separate schemas of one database neither serialise each other nor wake each other's followers.
SCHEMA_LOCK_KEY = zlib.crc32(b"loopserve.feedback_log.schema")


def _append_lock_key(schema: str) -> int:
    return zlib.crc32(f"loopserve.feedback_log.append:{schema}".encode())


def _channel(schema: str) -> str:
    return f"loopserve_feedback_log_{zlib.crc32(schema.encode()):08x}"


# A session that dies mid-append releases the lock with its connection; one that hangs idle inside
# its transaction is cut off after this, so it cannot stall every other replica's appends.
IDLE_IN_TX_TIMEOUT = "60s"

SCHEMA = f"""
CREATE SEQUENCE IF NOT EXISTS records_seq;
CREATE TABLE IF NOT EXISTS records (
    seq BIGINT PRIMARY KEY,
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
    needs_review BOOLEAN,
    created DOUBLE PRECISION NOT NULL,
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
INSERT INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}') ON CONFLICT DO NOTHING;
"""


class PostgresFeedbackLog(SqlFeedbackLog):
    """The log in a PostgreSQL database (tables created if missing)."""

    SELECT_KEY_SEQS = "SELECT idempotency_key, seq, body FROM records WHERE idempotency_key = ANY(%s)"
    SELECT_DECISION_IDS = "SELECT decision_id FROM records WHERE decision_id = ANY(%s)"
    SELECT_DECISION_BODIES = "SELECT body FROM records WHERE decision_id = ANY(%s)"
    SELECT_AFTER = "SELECT seq, type, body FROM records WHERE seq > %s ORDER BY seq LIMIT %s"
    SELECT_FEEDBACK_ON = (
        "SELECT body FROM records WHERE type = 'feedback' AND "
        "(event_id = ANY(%s) OR chosen_event_id = ANY(%s) OR rejected_event_id = ANY(%s)) ORDER BY seq"
    )
    COPY = {t: f"COPY records ({', '.join(c)}) FROM STDIN" for t, c in COLUMNS_OF.items()}

    def __init__(self, url: str, *, connect_timeout_s: float = 10.0) -> None:
        self._url = url
        self._connect_timeout_s = connect_timeout_s
        # One connection for appends, one for reads, each behind a lock (a psycopg connection runs one
        # transaction at a time). Reconnected on the next call if the server dropped them.
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._write_conn: psycopg.Connection[Any] | None = None
        self._read_conn: psycopg.Connection[Any] | None = None
        self._closed = False
        with self._write_lock:
            conn = self._write_connection()
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT current_schema()")
                (schema,) = cur.fetchone() or (None,)
                if schema is None:
                    raise FailedPrecondition(
                        "feedback log database has no schema on the search_path to create tables in"
                    )
                self.schema: str = schema
                self._lock_key = _append_lock_key(schema)
                self._channel = _channel(schema)
                # Replicas starting together must not race on CREATE ... IF NOT EXISTS.
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
                cur.execute(SCHEMA)
                cur.execute("SELECT value FROM meta WHERE key = 'schema_version'")
                (version,) = cur.fetchone() or ("?",)
        if version != str(SCHEMA_VERSION):
            raise FailedPrecondition(
                f"feedback log database has schema version {version}; this build reads {SCHEMA_VERSION}"
            )

    def __repr__(self) -> str:
        # Never the URL: it may carry a password.
        return "PostgresFeedbackLog()"

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self._url, autocommit=True, connect_timeout=int(self._connect_timeout_s))
        conn.execute(f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TX_TIMEOUT}'")
        return conn

    def _write_connection(self) -> psycopg.Connection[Any]:
        if self._closed:
            raise RuntimeError("feedback log is closed")
        if self._write_conn is None or self._write_conn.closed or self._write_conn.broken:
            self._write_conn = self._connect()
        return self._write_conn

    def _read_connection(self) -> psycopg.Connection[Any]:
        if self._closed:
            raise RuntimeError("feedback log is closed")
        if self._read_conn is None or self._read_conn.closed or self._read_conn.broken:
            self._read_conn = self._connect()
        return self._read_conn

    @contextlib.contextmanager
    def _write_tx(self) -> Iterator[psycopg.Cursor[Any]]:
        with self._write_lock:
            # The lock comes first in the transaction: see the module docstring.
            with self._begin(self._write_connection, "SELECT pg_advisory_xact_lock(%s)", (self._lock_key,)) as cur:
                yield cur

    @contextlib.contextmanager
    def _read_tx(self) -> Iterator[psycopg.Cursor[Any]]:
        with self._read_lock:
            # One snapshot for a page and its joins.
            with self._begin(
                self._read_connection, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
            ) as cur:
                yield cur

    @contextlib.contextmanager
    def _begin(
        self, connection: Callable[[], psycopg.Connection[Any]], first: str, params: tuple[Any, ...] = ()
    ) -> Iterator[psycopg.Cursor[Any]]:
        """Open a transaction and run its first statement, reconnecting once if the connection turns
        out to be dead (server restart, failover, idle cut-off). Nothing was sent for the caller yet,
        so the retry cannot duplicate anything; a connection lost later fails the call as usual."""
        for attempt in (1, 2):
            conn = connection()
            stack = contextlib.ExitStack()
            try:
                stack.enter_context(conn.transaction())
                cur = stack.enter_context(conn.cursor())
                cur.execute(first, params or None)
            except psycopg.OperationalError as err:
                with contextlib.suppress(psycopg.Error):
                    stack.close()
                if attempt == 2 or not conn.broken:
                    raise
                logger.info("feedback log connection lost (%s); reconnecting", type(err).__name__)
                conn.close()
                continue
            with stack:
                yield cur
            return

    def _next_seqs(self, cur: Any, n: int) -> list[int]:
        # Under the append lock (see module docstring), so these are above every visible seq.
        cur.execute("SELECT nextval('records_seq') FROM generate_series(1, %s)", (n,))
        return sorted(int(row[0]) for row in cur.fetchall())

    def _insert_rows(self, cur: Any, record_type: RecordType, rows: list[Row]) -> None:
        with cur.copy(self.COPY[record_type]) as copy:
            for row in rows:
                copy.write_row(row)

    def _after_append(self, cur: Any) -> None:
        cur.execute("SELECT pg_notify(%s, '')", (self._channel,))

    def _list_param(self, values: Sequence[str]) -> Any:
        return list(values)

    def _append_waiter(self) -> AppendWaiter:
        return _NotifyWaiter(self._connect, self._channel)

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            if self._closed:
                return
            self._closed = True
            for conn in (self._write_conn, self._read_conn):
                if conn is not None:
                    conn.close()


class _NotifyWaiter:
    """Waits for a NOTIFY on the log's channel on its own connection (LISTEN needs a session that is
    not busy in transactions). If that connection fails it degrades to sleeping, and reconnects on a
    later wait, so a follower keeps working (more slowly) through a database restart."""

    _SLICE_S = 0.25  # how often `stop` is checked while waiting

    def __init__(self, connect: Any, channel: str) -> None:
        self._connect = connect
        self._channel = channel
        self._conn: psycopg.Connection[Any] | None = None
        self._listen()

    def _listen(self) -> None:
        try:
            conn = self._connect()
            conn.execute(f"LISTEN {self._channel}")
        except psycopg.Error as err:
            logger.warning("feedback log LISTEN failed (%s); polling instead", type(err).__name__)
            self._conn = None
        else:
            self._conn = conn

    def wait(self, timeout_s: float, stop: threading.Event | None) -> None:
        if self._conn is None or self._conn.closed:
            self._listen()
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0 and not (stop is not None and stop.is_set()):
            if self._conn is None:
                (stop.wait if stop is not None else time.sleep)(min(remaining, self._SLICE_S))
                continue
            try:
                if list(self._conn.notifies(timeout=min(remaining, self._SLICE_S), stop_after=1)):
                    # Several commits may have notified: drain them so the next wait really waits.
                    list(self._conn.notifies(timeout=0))
                    return
            except psycopg.Error as err:
                logger.warning("feedback log LISTEN connection lost (%s); polling", type(err).__name__)
                self.close()

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
