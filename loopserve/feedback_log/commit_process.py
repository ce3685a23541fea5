"""Feedback commits on a second core: the database half of each group commit runs in a child process.

One committer thread (`writer.FeedbackCommitter`) converts, checks and writes every event, and under the
GIL that thread is the whole ingest path: SubmitChunks reached about half of the log's own append rate
on 2 cores with the other core idle (27 us of committer CPU an event against 17 us for the append alone). Split here:

- this process (`ProcessCommitter`, the committer's thread): builds the events from the wire, checks
  their shape and makes each row's JSON body (`sql.prepare_feedback`), then sends the batch on;
- the child (`python -m loopserve.feedback_log.commit_process`, its own interpreter and GIL): looks up
  keys and decisions, checks references, inserts and commits (`SqlFeedbackLog.append_prepared`), and
  answers with the results.

Up to `depth` batches are in flight, so the next batch is prepared here while the child commits the
last. Durability is unchanged: a caller's future resolves only from the child's answer, which it sends
after COMMIT returned. If the child dies, the batches in flight fail UNAVAILABLE (never acknowledged, so
a retry with the same keys is safe even where the commit landed) and the next batch starts a new child.
The child reads its log URL from the socket, not argv (a PostgreSQL URL may hold a password), and exits
when its socket closes, so it never outlives the service, even one killed with SIGKILL.
"""

from __future__ import annotations

import argparse
import collections
import logging
import operator
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, Unpack

import msgpack

from loopserve import metrics
from loopserve.errors import LoopserveError, Unavailable
from loopserve.feedback_log.base import LabelSets
from loopserve.feedback_log.records import _FEEDBACK_FIELDS, Feedback, FeedbackResult
from loopserve.feedback_log.sql import prepare_feedback
from loopserve.feedback_log.writer import CommitterOptions, GroupCommitter, _Request, describe_error

logger = logging.getLogger(__name__)

_values = operator.attrgetter(*_FEEDBACK_FIELDS)
"""A `Feedback` as the tuple of its fields (rebuilt by the writer with `Feedback(*values)`)."""


def _dumps(obj: object) -> bytes:
    """The wire format between the service and its writer: MessagePack, never pickle (what the writer reads
    must not be able to run code). A batch is lists of strings and numbers, so nothing richer is needed, and
    it packs and unpacks at pickle's speed: 0.35 + 0.5 us an event for a batch of corrections, where JSON
    took 2.1 + 2.3 us (6.7 + 6.3 us for text preferences, whose long texts it escapes), which was a quarter
    of the service's CPU per event."""
    return msgpack.packb(obj, use_bin_type=True)


def _loads(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


Reply = tuple[Any, ...]
"""From the child: ("ok", [(index, accepted, duplicate, code, reason, seq), ...] by index), ("refused", code,
message) for a domain error of the whole batch, or ("failed", error class) for anything else."""


class _Child:
    """One writer process and the batches it has not answered yet, answered in the order sent."""

    def __init__(self, log_url: str, *, depth: int, start_timeout_s: float, log_level: str) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", __name__, "--fd", str(theirs.fileno()), "--log-level", log_level],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                # Its own session: a Ctrl-C at the terminal reaches the service, which closes it in order.
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self._lock = threading.Lock()
        self._waiting: collections.deque[Callable[[Reply | None], None]] = collections.deque()
        self._room = threading.Semaphore(depth)
        self._receiver: threading.Thread | None = None
        self.alive = True
        try:
            self.conn.send_bytes(log_url.encode())
            if not self.conn.poll(start_timeout_s):
                raise Unavailable(f"the feedback writer process did not start within {start_timeout_s:.0f}s")
            hello = _loads(self.conn.recv_bytes())
            if hello[0] != "ready":
                raise Unavailable(f"the feedback writer process could not open the log: {hello[1]}")
        except (EOFError, OSError):
            self.stop(0)
            raise Unavailable("the feedback writer process exited while starting") from None
        except BaseException:
            self.stop(0)
            raise
        self._receiver = threading.Thread(target=self._receive, name="feedback-writer-replies", daemon=True)
        self._receiver.start()

    @property
    def unanswered(self) -> int:
        with self._lock:
            return len(self._waiting)

    def send(self, payload: bytes, done: Callable[[Reply | None], None]) -> bool:
        """Send a batch; `done(reply)` runs on the reply thread, `done(None)` if the child died first.
        Blocks while `depth` batches are unanswered. False (and `done` not called) if the child is gone."""
        self._room.acquire()
        with self._lock:
            if not self.alive:
                self._room.release()
                return False
            self._waiting.append(done)
        try:
            self.conn.send_bytes(payload)  # outside the lock: the reply thread must keep reading meanwhile
        except OSError:
            pass  # the child is gone: the reply thread sees EOF and answers `done` with None
        return True

    def _receive(self) -> None:
        while True:
            try:
                reply = _loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                break
            with self._lock:
                done = self._waiting.popleft()
            self._room.release()
            done(reply)
        with self._lock:
            self.alive = False
            orphans = list(self._waiting)
            self._waiting.clear()
        for done in orphans:
            self._room.release()
            done(None)

    def stop(self, timeout_s: float) -> int | None:
        """Ask the child to finish (it answers what it has read first), then wait; kill it after
        `timeout_s`. Returns its exit code."""
        try:
            self.conn.send_bytes(b"")
        except OSError:
            pass
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self._receiver is not None:
            # The child's last answers may still sit in the socket: read them (EOF follows) before closing,
            # or their callers would be told UNAVAILABLE about events that are committed.
            self._receiver.join(timeout_s)
        self.conn.close()
        return code


class ProcessCommitter(GroupCommitter):
    """A `GroupCommitter` whose transactions run in a child process (see the module docstring).

    Same contract: `submit` / `submit_deferred` / `commit` resolve once the events are durable, merged
    into group commits; a batch that fails fails its callers alone; back-pressure by `capacity`.
    `max_batch` defaults lower than the in-process committer's: the two processes overlap batch by batch,
    and through the service 1,000-event batches ingested faster than 2,000 or 5,000 (bench/ingest.py).
    `depth`: batches sent and not yet answered (2: one committing, the next waiting in the socket)."""

    def __init__(
        self,
        log_url: str,
        *,
        depth: int = 2,
        start_timeout_s: float = 60.0,
        **options: Unpack[CommitterOptions],
    ) -> None:
        if depth < 1:
            raise ValueError("depth must be positive")
        self._log_url = log_url
        self._depth = depth
        self._start_timeout_s = start_timeout_s
        self._log_level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        self._child: _Child | None = None
        self.restarts = 0
        options.setdefault("max_batch", 1000)
        super().__init__(**options)
        # Started now (no request can be queued before this returns), so that a log the child cannot
        # open fails the service at start, not a client later.
        try:
            self._child = self._start_child()
        except BaseException:
            super().close()
            raise

    def _start_child(self) -> _Child:
        return _Child(
            self._log_url, depth=self._depth, start_timeout_s=self._start_timeout_s, log_level=self._log_level
        )

    @property
    def unanswered(self) -> int:
        """Batches sent to the writer process and not answered yet."""
        child = self._child
        return child.unanswered if child is not None else 0

    @property
    def child_pid(self) -> int | None:
        """The writer process's pid (None between a crash and the next batch)."""
        child = self._child
        return child.proc.pid if child is not None and child.alive else None

    def _dispatch(self, batch: list[_Request], label_sets: dict[str, frozenset[str]], total: int) -> None:
        try:
            ready = self._ready(batch)
            events = [e for req in ready for e in req.events]
            rejected, prepared = prepare_feedback(events)
        except BaseException as err:
            self._fail([req for req in batch if not req.future.done()], err)
            self._release(total)
            return
        if not prepared:  # every event refused by its shape: nothing for the child
            self._answer(ready, rejected)
            self._release(total)
            return

        def done(reply: Reply | None) -> None:
            try:
                self._reply(ready, events, rejected, reply)
            except Exception as err:  # a bug here must not leave callers waiting for an answer
                self._fail([req for req in ready if not req.future.done()], err)
            finally:
                self._release(total)

        try:
            payload = _dumps(
                ([(i, _values(fb), body) for i, fb, body in prepared], {t: sorted(ls) for t, ls in label_sets.items()})
            )
            child = self._live_child()
            sent = child.send(payload, done)
        except BaseException as err:  # no writer could be started (or the batch not sent): this batch fails
            self._fail(ready, err)
            self._release(total)
            return
        if not sent:  # died since `_live_child`: the next batch starts another
            self._fail(ready, _child_gone())
            self._release(total)

    def _live_child(self) -> _Child:
        child = self._child
        if child is not None and child.alive:
            return child
        if child is not None:
            code = child.stop(1.0)
            logger.error("feedback writer process exited (code %s); starting another", code)
            self.restarts += 1
            metrics.FEEDBACK_WRITER_RESTARTS.inc()
        self._child = None
        self._child = self._start_child()
        return self._child

    def _reply(
        self, batch: list[_Request], events: Sequence[Feedback], rejected: list[FeedbackResult], reply: Reply | None
    ) -> None:
        if reply is None:
            self._fail(batch, _child_gone())
            return
        if reply[0] == "refused":
            err = LoopserveError(reply[2])
            err.code = reply[1]
            self._fail(batch, err)
            return
        if reply[0] != "ok":
            self._fail(batch, RuntimeError(reply[1]))  # logged by class name; callers get UNAVAILABLE
            return
        merged: list[list[Any]] = reply[1]  # [index, accepted, duplicate, code, reason, seq] as lists
        if rejected:
            merged += [[r.index, False, False, r.code, r.reason, 0] for r in rejected]
            merged.sort()
        self._answer_rows(batch, events, merged)

    def _answer_rows(self, batch: list[_Request], events: Sequence[Feedback], rows: list[list[Any]]) -> None:
        """`_answer` from the child's result rows (one per event, in batch order): each caller's results
        are built once, already in its own indices."""
        self.batches += 1
        offset = 0
        for req in batch:
            end = offset + req.count
            req.future.set_result(
                [
                    FeedbackResult(i - offset, events[i].idempotency_key, accepted, duplicate, code, reason, seq)
                    for i, accepted, duplicate, code, reason, seq in rows[offset:end]
                ]
            )
            offset = end

    def close(self, timeout: float | None = 30.0) -> None:
        super().close(timeout)  # commits what is queued
        child, self._child = self._child, None
        if child is not None:
            child.stop(timeout if timeout is not None else 30.0)


def _child_gone() -> Unavailable:
    return Unavailable(
        "the feedback writer process stopped before answering; retry with the same idempotency keys "
        "(a retry is never stored twice)"
    )


# ---- the child --------------------------------------------------------------------------------------


def _serve(conn: Connection) -> None:
    from loopserve.feedback_log import open_feedback_log
    from loopserve.feedback_log.sql import SqlFeedbackLog

    url = conn.recv_bytes().decode()
    try:
        log = open_feedback_log(url)
        if not isinstance(log, SqlFeedbackLog):
            raise TypeError(f"{type(log).__name__} cannot append prepared feedback")
    except Exception as err:
        conn.send_bytes(_dumps(("error", describe_error(err))))
        return
    conn.send_bytes(_dumps(("ready",)))
    try:
        while data := conn.recv_bytes():  # b"": the parent is closing
            wire, label_sets = _loads(data)
            conn.send_bytes(_dumps(_append(log, wire, label_sets)))
    except (EOFError, OSError):
        pass  # the parent is gone: nothing is waiting for an answer
    finally:
        log.close()


def _append(log: Any, wire: list[tuple[int, tuple[Any, ...], str]], label_sets: LabelSets) -> Reply:
    try:
        results = log.append_prepared([(i, Feedback(*values), body) for i, values, body in wire], label_sets)
    except LoopserveError as err:
        return ("refused", err.code, err.message)
    except Exception as err:
        logger.warning("feedback commit of %d events failed: %s", len(wire), describe_error(err))
        return ("failed", describe_error(err))
    rows = [(r.index, r.accepted, r.duplicate, r.code, r.reason, r.seq) for r in results]
    rows.sort()  # by index (unique): the batch's order
    return ("ok", rows)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="loopserve's feedback writer (started by the policy service)")
    ap.add_argument("--fd", type=int, required=True, help="the socket to the service")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service stops it in order, after its last batch
    conn = Connection(args.fd)
    try:
        _serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    main()
