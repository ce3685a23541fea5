"""Raw feedback-log ingest rate, in process, for each backend: how many durable feedback events a second.

Measures `FeedbackLog.append_feedback` at batch 1, 100 and 1000 events per call (one transaction
each), then `FeedbackCommitter` with 8 threads calling `commit` concurrently (1 and 100 events per
call), which is what the FeedbackService's Submit/SubmitStream handlers do. Every accepted event is
durable when the call returns (SQLite WAL + synchronous=FULL; PostgreSQL with fsync and
synchronous_commit on, a private server started for the run). Events are label accepts/corrections
on served decisions (~300-byte rows), each with a fresh idempotency key. No gRPC: this is the
ceiling the service path is judged against. Besides wall-clock events/s it records CPU time per event
in this process (all threads), which is steadier than throughput on a shared machine: 1e6 / that is
the rate one core could sustain if the disk kept up. Writes bench/results/ingest_raw.json.

    .venv/bin/python bench/ingest_raw.py [--seconds 3] [--backends sqlite postgres]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from loopserve.feedback_log import (  # noqa: E402
    Decision,
    Feedback,
    FeedbackCommitter,
    FeedbackLog,
    open_feedback_log,
)

RESULTS = REPO / "bench" / "results" / "ingest_raw.json"
LABELS = {"sentiment": ["great", "other"]}
N_DECISIONS = 1000
MAX_EVENTS = {1: 20_000, 100: 200_000, 1000: 500_000}
THREADS = 8


def decisions() -> list[Decision]:
    rng = random.Random(0)
    words = "coffee tea flavor taste bought package price great love bitter sweet fresh stale".split()
    out = []
    for i in range(N_DECISIONS):
        p = rng.uniform(0.5, 1.0)
        out.append(
            Decision(
                event_id=f"bench-{i:06d}",
                task="sentiment",
                kind="label",
                input_text=" ".join(rng.choice(words) for _ in range(20)),
                output=[("great", p), ("other", 1 - p)],
                propensity=p,
                propensity_kind="prob",
                model="annotator",
                model_version="v1",
                client_id="bench",
            )
        )
    return out


class Events:
    """Feedback events on random served decisions, half accepts, half corrections; cheap to make (a
    counter, not uuid4, for keys) so that the client side does not eat the log's CPU."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._prefix = f"{uuid.uuid4().hex[:12]}-{seed}"
        self._n = 0

    def take(self, n: int) -> list[Feedback]:
        out = []
        for _ in range(n):
            self._n += 1
            key = f"{self._prefix}-{self._n}"
            eid = f"bench-{self._rng.randrange(N_DECISIONS):06d}"
            if self._n % 2:
                out.append(Feedback("accept", key, event_id=eid, annotator_id="annotator-17"))
            else:
                out.append(Feedback("correction", key, event_id=eid, label="other", annotator_id="annotator-17"))
        return out


def bench_batches(log: FeedbackLog, batch: int, seconds: float) -> dict[str, Any]:
    source = Events(batch)
    n = 0
    started, cpu = time.perf_counter(), time.process_time()
    while n < MAX_EVENTS[batch] and time.perf_counter() - started < seconds:
        events = source.take(batch)
        results = log.append_feedback(events, LABELS)
        assert all(r.accepted for r in results)
        n += batch
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "batch": batch,
        "events": n,
        "seconds": round(elapsed, 3),
        "events_per_s": round(n / elapsed),
        "cpu_us_per_event": round(cpu / n * 1e6, 1),
    }


def bench_committer(log: FeedbackLog, per_call: int, seconds: float) -> dict[str, Any]:
    committer = FeedbackCommitter(log)
    latencies: list[float] = []
    counts = [0] * THREADS
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(t: int) -> None:
        source = Events(1000 + t)
        mine = []
        while time.perf_counter() < deadline:
            events = source.take(per_call)
            t0 = time.perf_counter()
            results = committer.commit(events, LABELS, timeout=30)
            mine.append(time.perf_counter() - t0)
            assert all(r.accepted for r in results)
            counts[t] += per_call
        with lock:
            latencies.extend(mine)

    started, cpu = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=client, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    committer.close()
    n = sum(counts)
    q = statistics.quantiles(latencies, n=100)
    return {
        "threads": THREADS,
        "events_per_call": per_call,
        "events": n,
        "seconds": round(elapsed, 3),
        "events_per_s": round(n / elapsed),
        "cpu_us_per_event": round(cpu / n * 1e6, 1),
        "transactions": committer.batches,
        "mean_events_per_transaction": round(n / max(committer.batches, 1), 1),
        "commit_latency_ms": {"p50": round(q[49] * 1e3, 2), "p99": round(q[98] * 1e3, 2)},
    }


@contextlib.contextmanager
def backend_url(name: str, workdir: Path) -> Iterator[str]:
    if name == "sqlite":
        yield str(workdir / "bench.sqlite")
        return
    from tests.support.pg_server import postgres_server

    with postgres_server(database="bench") as url:
        yield url


def row_bytes(log: FeedbackLog) -> int:
    """Mean stored body size of the feedback rows written (the JSON record; columns add ~100 bytes)."""
    recs = [r for r in log.read(after_seq=N_DECISIONS, limit=1000) if r.type == "feedback"]
    return round(statistics.mean(len(json.dumps(r.record.to_dict())) for r in recs))


def run_backend(name: str, seconds: float) -> dict[str, Any]:
    # On the repository's disk, not a tmpfs: fsync must cost what it costs in production.
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=RESULTS.parent, prefix="ingest-", suffix=".tmp") as tmp,
        backend_url(name, Path(tmp)) as url,
    ):
        log = open_feedback_log(url)
        try:
            log.append_decisions(decisions())
            out: dict[str, Any] = {"append_feedback": [], "committer": []}
            for batch in (1, 100, 1000):
                r = bench_batches(log, batch, seconds)
                out["append_feedback"].append(r)
                print(
                    f"{name:8s} append_feedback batch={batch:<5d} {r['events_per_s']:>8d} ev/s "
                    f"({r['cpu_us_per_event']} us CPU/event)"
                )
            for per_call in (1, 100):
                r = bench_committer(log, per_call, seconds)
                out["committer"].append(r)
                print(
                    f"{name:8s} committer {THREADS} threads x {per_call:<3d}/call "
                    f"{r['events_per_s']:>8d} ev/s ({r['mean_events_per_transaction']} ev/tx, "
                    f"p50 {r['commit_latency_ms']['p50']} ms, {r['cpu_us_per_event']} us CPU/event)"
                )
            out["feedback_body_bytes"] = row_bytes(log)
            return out
        finally:
            log.close()


def postgres_version() -> str | None:
    from tests.support.pg_server import BINDIR

    return BINDIR.parent.name if BINDIR.exists() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    args = ap.parse_args()

    results: dict[str, Any] = {
        "benchmark": "ingest_raw",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "postgresql": postgres_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "seconds_per_measurement": args.seconds,
        "durability": "every accepted event durable on return (fsync'd commit)",
        "backends": {},
    }
    for name in args.backends:
        results["backends"][name] = run_backend(name, args.seconds)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
