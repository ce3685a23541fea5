"""Feedback ingestion benchmark, and what decision logging costs Annotate.

1. Feedback events/s through the real policy service: `SubmitStream` (one stream) and batched `Submit`
   (500 events a call, 4 concurrent callers), on SQLite and on PostgreSQL (a throwaway server on
   loopback), beside the raw in-process `append_feedback` rate of the same backend (the limit).
2. Annotate items/s through gRPC at 32 concurrent clients with decision logging on vs off.

The service runs in its own process; clients run here. Writes bench/results/ingest.json.

    .venv/bin/python bench/ingest.py [--events 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.serving import free_port, load, start_service, wait_ready  # noqa: E402
from loopserve.auth import ensure_token_file, read_token  # noqa: E402
from loopserve.client import AsyncClient, RetryPolicy  # noqa: E402
from loopserve.feedback.v1 import feedback_pb2 as fb  # noqa: E402
from loopserve.feedback_log import Decision, Feedback, open_feedback_log  # noqa: E402
from loopserve.model_store import ModelStore  # noqa: E402
from loopserve.models import provision  # noqa: E402
from tests.pg_server import create_schema, postgres_server  # noqa: E402

TASK = "sentiment"
LABELS = {TASK: ["great", "other"]}


def start(data_dir: Path, port: int, mport: int, log_url: str, log_decisions: bool = True) -> subprocess.Popen:
    extra = ["--log-url", log_url, *([] if log_decisions else ["--no-log-decisions"])]
    return start_service(data_dir, port, mport, extra=extra)


def events_for(event_ids: list[str], n: int) -> list[fb.FeedbackEvent]:
    run = uuid.uuid4().hex[:8]
    return [
        fb.FeedbackEvent(
            idempotency_key=f"{run}-{i}",
            annotator_id="bench",
            correction=fb.LabelCorrection(event_id=event_ids[i % len(event_ids)], label="great" if i % 2 else "other"),
        )
        for i in range(n)
    ]


def raw_rate(log_url: str, n: int) -> dict:
    """In-process append_feedback at 1000 events per transaction: the backend's limit."""
    log = open_feedback_log(log_url)
    eids = [uuid.uuid4().hex for _ in range(100)]
    log.append_decisions(
        [
            Decision(e, TASK, "label", "text", (("great", 0.6), ("other", 0.4)), 0.6, "prob", "annotator", "v0")
            for e in eids
        ]
    )
    run = uuid.uuid4().hex[:8]
    evs = [
        Feedback(kind="correction", idempotency_key=f"raw-{run}-{i}", event_id=eids[i % 100], label="great")
        for i in range(n)
    ]
    start_t = time.perf_counter()
    for i in range(0, n, 1000):
        log.append_feedback(evs[i : i + 1000], LABELS)
    dt = time.perf_counter() - start_t
    log.close()
    return {"events": n, "events_per_s": n / dt}


async def through_service(data_dir: Path, log_url: str, n: int) -> dict:
    port, mport = free_port(), free_port()
    proc = start(data_dir, port, mport, log_url)
    target = f"127.0.0.1:{port}"
    try:
        await wait_ready(target, read_token(data_dir / "tokens.json", "client"))
        async with AsyncClient(target, read_token(data_dir / "tokens.json", "client")) as c:
            eids = [a.event_id for a in (await c.annotate([f"review {i}" for i in range(100)])).annotations]
        ann = read_token(data_dir / "tokens.json", "annotator")
        async with AsyncClient(target, ann, timeout_s=600, retry=RetryPolicy(attempts=1)) as a:
            evs = events_for(eids, n)
            t = time.perf_counter()
            summary = await a.submit_stream(evs)
            stream_s = time.perf_counter() - t
            assert summary.accepted == n, summary
            evs = events_for(eids, n)
            t = time.perf_counter()
            chunks = [evs[i : i + 500] for i in range(0, n, 500)]
            sem = asyncio.Semaphore(4)

            async def one(chunk: list[fb.FeedbackEvent]) -> int:
                async with sem:
                    return (await a.submit(chunk)).accepted

            accepted = sum(await asyncio.gather(*(one(ch) for ch in chunks)))
            submit_s = time.perf_counter() - t
            assert accepted == n
        return {
            "events": n,
            "submit_stream_events_per_s": n / stream_s,
            "submit_batched_events_per_s": n / submit_s,
        }
    finally:
        proc.terminate()
        proc.wait(30)


async def logging_cost(data_dir: Path, seconds: float) -> dict:
    out = {}
    for on in (False, True, False, True):  # interleaved, so drift in machine load hits both
        port, mport = free_port(), free_port()
        proc = start(data_dir, port, mport, str(data_dir / f"cost-{uuid.uuid4().hex[:6]}.sqlite3"), on)
        target = f"127.0.0.1:{port}"
        try:
            token = read_token(data_dir / "tokens.json", "client")
            await wait_ready(target, token)
            await load(target, token, 32, 2.0)
            r = await load(target, token, 32, seconds)
            out.setdefault("on" if on else "off", []).append(r["items_per_s"])
            print(f"  decision logging {'on ' if on else 'off'}: {r['items_per_s']:.1f} items/s", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    off = sum(out["off"]) / len(out["off"])
    on = sum(out["on"]) / len(out["on"])
    return {"items_per_s_off": off, "items_per_s_on": on, "runs": out, "cost_fraction": 1 - on / off}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    real = ModelStore(REPO / ".loopserve" / "store")
    provision.pull(real, models=["annotator"])
    result: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "backends": {}}
    with tempfile.TemporaryDirectory() as tmp, postgres_server() as pg:
        data = Path(tmp)
        v = real.latest("annotator")
        assert v
        ModelStore(data / "store").publish_version("annotator", real.path("annotator", v))
        ensure_token_file(data / "tokens.json")
        for name, make_url in (
            ("sqlite", lambda: str(data / f"log-{uuid.uuid4().hex[:6]}.sqlite3")),
            ("postgres", lambda: create_schema(pg, f"bench_{uuid.uuid4().hex[:8]}")),
        ):
            raw = raw_rate(make_url(), args.events)
            svc = await through_service(data, make_url(), args.events)
            result["backends"][name] = {"raw_in_process": raw, "service": svc}
            print(
                f"{name}: raw {raw['events_per_s']:.0f}/s, SubmitStream {svc['submit_stream_events_per_s']:.0f}/s, "
                f"Submit x500 {svc['submit_batched_events_per_s']:.0f}/s",
                flush=True,
            )
        result["decision_logging"] = await logging_cost(data, args.seconds)
    result["targets"] = {"sqlite_submit_stream_events_per_s": 20_000, "decision_logging_cost_fraction": 0.10}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ingest.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("decision_logging",)}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
