"""`FeedbackLog`: the interface every backend implements (SQLite embedded, PostgreSQL for replicas).

The log is append-only and totally ordered by `seq`, one sequence across decisions and feedback, so a
consumer (the trainer) can read by cursor: store the last seq it has processed with its checkpoint,
and resume with `read(after_seq=cursor)`. Seqs only grow and are never reused, but may have gaps;
a backend must never make a smaller seq visible after a larger one (that would make a cursor skip it).

All methods are synchronous and thread-safe: the gRPC layer calls them from worker threads, and the
group committers in `writer.py` call them from their own threads.
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from loopserve.feedback_log.records import Decision, Feedback, FeedbackResult, LogRecord

LabelSets = Mapping[str, Collection[str]]
"""task -> its labels."""

DEFAULT_POLL_S = 0.05
MAX_POLL_S = 2.0


@dataclass(frozen=True, slots=True)
class LogStats:
    """Counts for dashboards and the trainer's lag metric."""

    max_seq: int
    decisions: int
    feedback: int
    feedback_by_kind: dict[str, int] = field(default_factory=dict)
    decisions_by_model_version: dict[str, dict[str, int]] = field(default_factory=dict)
    """model -> model_version -> decisions served by it."""
    label_decisions: int = 0
    needs_review: int = 0
    """Label decisions that were routed to review."""

    @property
    def review_rate(self) -> float | None:
        """Share of label decisions routed to a person (the loop should drive it down); None if none yet."""
        return self.needs_review / self.label_decisions if self.label_decisions else None


@dataclass(frozen=True, slots=True)
class ImportResult:
    decisions: int = 0
    """Decisions stored by this import."""
    feedback: int = 0
    skipped: int = 0
    """Records already present (decision by event_id, feedback by idempotency key)."""


class AppendWaiter(Protocol):
    """Blocks a follower until the log may have grown."""

    def wait(self, timeout_s: float, stop: threading.Event | None) -> None: ...

    def close(self) -> None: ...


class SleepWaiter:
    """Plain polling: sleep (or wait on `stop`, so that setting it ends the wait at once)."""

    def wait(self, timeout_s: float, stop: threading.Event | None) -> None:
        if stop is not None:
            stop.wait(timeout_s)
        else:
            time.sleep(timeout_s)

    def close(self) -> None:
        pass


class FeedbackLog(abc.ABC):
    """Durable, ordered store of decisions and feedback."""

    @abc.abstractmethod
    def append_decisions(self, decisions: Sequence[Decision]) -> None:
        """Store served answers in one transaction. An event_id already stored is skipped (a retry after
        an ambiguous commit must not fail). Raises InvalidArgument for a malformed decision (none stored).
        """

    @abc.abstractmethod
    def append_feedback(self, events: Sequence[Feedback], label_sets: LabelSets) -> list[FeedbackResult]:
        """Validate each event against the stored decisions and store the valid ones in one transaction.

        Returns one result per event, in order: accepted with its seq, a duplicate (its key was stored
        before, by any process: accepted, nothing new stored, the original seq), or rejected with a
        status code name and a reason. Accepted events are durable when this returns.
        """

    @abc.abstractmethod
    def get_decisions(self, event_ids: Iterable[str]) -> dict[str, Decision]:
        """The stored decisions among `event_ids`, by id (unknown ids are absent)."""

    @abc.abstractmethod
    def read(self, after_seq: int = 0, limit: int = 1000) -> list[LogRecord]:
        """Up to `limit` records with seq > `after_seq`, in seq order, joined (see `LogRecord`)."""

    @abc.abstractmethod
    def max_seq(self) -> int:
        """The largest seq a reader can see (0 for an empty log)."""

    @abc.abstractmethod
    def stats(self) -> LogStats: ...

    @abc.abstractmethod
    def export_jsonl(self, path_or_file: str | Path | IO[str], after_seq: int = 0) -> int:
        """Write records with seq > after_seq as JSON lines, in order; return how many were written."""

    @abc.abstractmethod
    def import_jsonl(self, path_or_file: str | Path | IO[str]) -> ImportResult:
        """Append the records of an export, in their order, skipping those already present."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def _append_waiter(self) -> AppendWaiter:
        """What `follow` blocks on between polls. Backends with a push signal (PostgreSQL LISTEN/NOTIFY)
        return a waiter that wakes up early when something is appended."""
        return SleepWaiter()

    def follow(
        self,
        after_seq: int = 0,
        *,
        poll_s: float = DEFAULT_POLL_S,
        max_poll_s: float = MAX_POLL_S,
        batch: int = 1000,
        stop: threading.Event | None = None,
    ) -> Iterator[LogRecord]:
        """Yield records with seq > after_seq as they arrive, until `stop` is set (or forever).

        While the log is idle it polls with exponential back-off from `poll_s` up to `max_poll_s`
        (cheap on an idle database, still prompt under load) and goes back to `poll_s` as soon as records
        arrive; a push-capable backend wakes up as soon as a write commits. The consumer's cursor is
        the seq of the last record it handled.
        """
        if not 0 < poll_s <= max_poll_s:
            raise ValueError(f"need 0 < poll_s <= max_poll_s, got {poll_s} and {max_poll_s}")
        delay = poll_s
        cursor = after_seq
        waiter = self._append_waiter()
        try:
            while stop is None or not stop.is_set():
                records = self.read(cursor, batch)
                if records:
                    delay = poll_s
                    for rec in records:
                        cursor = rec.seq
                        yield rec
                    continue
                waiter.wait(delay, stop)
                delay = min(delay * 2, max_poll_s)
        finally:
            waiter.close()

    def __enter__(self) -> FeedbackLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
