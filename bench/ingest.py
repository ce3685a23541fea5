"""Feedback ingestion benchmark, and what decision logging costs Annotate.

1. Feedback events/s through the real policy service, one client: `SubmitStream` (one message an
   event), `SubmitChunks` (bidirectional, 1,000 events a message, an ack per chunk; the median of 3
   runs) and batched `Submit` (500 events a call, 4 concurrent callers), on SQLite and on PostgreSQL
   (a throwaway server on loopback), beside the raw in-process `append_feedback` rate of the same
   backend and events (the log's own limit), measured in the same run. Each backend runs the service
   twice: committing in its writer process (the default, `service`) and on a thread of its own
   (`--no-ingest-process`, `service_in_thread`). Two workloads: label corrections on served answers
   (~300-byte rows) and text preference events (prompt + two texts, no served events).
2. Annotate items/s through gRPC at 32 concurrent clients with decision logging on vs off.

The service runs in its own process (`loopserve policy`, flags as `up` gives it); clients run here.
Writes bench/results/ingest.json and ingest.png, with the CPU model.

    .venv/bin/python bench/ingest.py [--events 50000] [--pref-events 60000] [--backends sqlite postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
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

from grpc import aio  # noqa: E402

from bench.common import cpu_model  # noqa: E402
from bench.serving import load, start_service, wait_ready  # noqa: E402
from loopserve.auth import ensure_token_file, read_token  # noqa: E402
from loopserve.client import AsyncClient, RetryPolicy  # noqa: E402
from loopserve.feedback.v1 import feedback_pb2 as fb  # noqa: E402
from loopserve.feedback.v1 import feedback_pb2_grpc  # noqa: E402
from loopserve.feedback_log import Decision, Feedback, open_feedback_log  # noqa: E402
from loopserve.models import provision  # noqa: E402
from loopserve.models.store import ModelStore  # noqa: E402
from loopserve.ports import free_port, free_ports  # noqa: E402
from tests.support.pg_server import create_schema, postgres_server  # noqa: E402

TASK = "sentiment"
LABELS = {TASK: ["great", "other"]}


def start(
    data_dir: Path, port: int, mport: int, log_url: str, log_decisions: bool = True, flags: tuple[str, ...] = ()
) -> subprocess.Popen:
    extra = ["--log-url", log_url, *([] if log_decisions else ["--no-log-decisions"]), *flags]
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


PROMPTS = [
    "Write a two-sentence review of a dark roast coffee for a shop's website.",
    "Summarise this customer's complaint about a late delivery in one polite sentence.",
    "Suggest a name for a green tea blend with mint and lemon peel.",
]
CHOSEN = "Rich and smooth, with notes of cocoa and a long nutty finish; it holds up well with milk."
REJECTED = "It is coffee. It is dark. People may like it or not, depending on what they like in coffee."


def preference_events(n: int) -> list[fb.FeedbackEvent]:
    """Text preferences (prompt + two texts, no served events): ~250 bytes of text each."""
    run = uuid.uuid4().hex[:8]
    return [
        fb.FeedbackEvent(
            idempotency_key=f"{run}-p{i}",
            annotator_id="bench",
            preference=fb.Preference(prompt=PROMPTS[i % 3], chosen=f"{CHOSEN} ({i})", rejected=REJECTED),
        )
        for i in range(n)
    ]


class CountingFeedback(feedback_pb2_grpc.FeedbackServiceServicer):
    """A FeedbackService that only counts what arrives: the floor grpc-python itself sets."""

    async def SubmitStream(self, request_iterator, context):  # type: ignore[no-untyped-def]
        n = 0
        async for _ in request_iterator:
            n += 1
        return fb.SubmitSummary(received=n, accepted=n)

    async def SubmitChunks(self, request_iterator, context):  # type: ignore[no-untyped-def]
        k = 0
        async for chunk in request_iterator:
            yield fb.ChunkAck(chunk=k, accepted=len(chunk.events))
            k += 1


def _serve_counting(port: int) -> None:
    async def run() -> None:
        server = aio.server()
        feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(CountingFeedback(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


async def grpc_floor(n: int) -> dict:
    """Events/s when the server does nothing but count them (no auth, no log): one message an event
    (SubmitStream) against 1,000 events a message (SubmitChunks)."""
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(target=_serve_counting, args=(port,), daemon=True)
    server.start()
    evs = events_for([uuid.uuid4().hex], n)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await ch.channel_ready()
            stub = feedback_pb2_grpc.FeedbackServiceStub(ch)
            await stub.SubmitStream(iter(evs[:100]))
            t = time.perf_counter()
            assert (await stub.SubmitStream(iter(evs))).received == n
            stream = n / (time.perf_counter() - t)
            t = time.perf_counter()
            chunks = [fb.SubmitRequest(events=evs[i : i + 1000]) for i in range(0, n, 1000)]
            assert sum([ack.accepted async for ack in stub.SubmitChunks(iter(chunks))]) == n
            chunked = n / (time.perf_counter() - t)
    finally:
        server.terminate()
        server.join(10)
    print(f"  grpc floor (server only counts): SubmitStream {stream:.0f}/s, SubmitChunks {chunked:.0f}/s", flush=True)
    return {"events": n, "submit_stream_events_per_s": stream, "submit_chunks_events_per_s": chunked}


def raw_rate(log_url: str, n: int, workload: str = "corrections") -> dict:
    """In-process append_feedback at 1000 events per transaction: the backend's limit (median of 3 runs)."""
    log = open_feedback_log(log_url)
    eids = [uuid.uuid4().hex for _ in range(100)]
    log.append_decisions(
        [
            Decision(e, TASK, "label", "text", (("great", 0.6), ("other", 0.4)), 0.6, "prob", "annotator", "v0")
            for e in eids
        ]
    )
    runs = []
    for _ in range(3):  # the median of 3, as the service's SubmitChunks figure it is compared with
        run = uuid.uuid4().hex[:8]
        if workload == "preferences":
            evs = [
                Feedback(
                    kind="preference",
                    idempotency_key=f"raw-{run}-{i}",
                    prompt=PROMPTS[i % 3],
                    chosen=f"{CHOSEN} ({i})",
                    rejected=REJECTED,
                    annotator_id="bench",
                )
                for i in range(n)
            ]
        else:
            evs = [
                Feedback(kind="correction", idempotency_key=f"raw-{run}-{i}", event_id=eids[i % 100], label="great")
                for i in range(n)
            ]
        start_t = time.perf_counter()
        for i in range(0, n, 1000):
            log.append_feedback(evs[i : i + 1000], LABELS)
        runs.append(n / (time.perf_counter() - start_t))
    log.close()
    return {"events": n, "events_per_s": sorted(runs)[1], "runs": runs}


async def through_service(data_dir: Path, log_url: str, n: int, n_pref: int, flags: tuple[str, ...] = ()) -> dict:
    port, mport = free_ports(2)
    proc = start(data_dir, port, mport, log_url, flags=flags)
    target = f"127.0.0.1:{port}"
    out: dict = {"events": n, "pref_events": n_pref, "flags": list(flags)}
    try:
        await wait_ready(target, read_token(data_dir / "tokens.json", "client"))
        async with AsyncClient(target, read_token(data_dir / "tokens.json", "client")) as c:
            eids = [a.event_id for a in (await c.annotate([f"review {i}" for i in range(100)])).annotations]
        ann = read_token(data_dir / "tokens.json", "annotator")
        async with AsyncClient(target, ann, timeout_s=600, retry=RetryPolicy(attempts=1)) as a:
            # Warm both paths (first-call costs: channel, handler set-up) outside the timings.
            await a.submit_chunks(events_for(eids, 2000))
            await a.submit_stream(events_for(eids, 200))

            async def timed(name: str, evs: list[fb.FeedbackEvent], send) -> None:  # type: ignore[no-untyped-def]
                t = time.perf_counter()
                accepted = await send(evs)
                dt = time.perf_counter() - t
                assert accepted == len(evs), (name, accepted)
                out[name] = len(evs) / dt
                print(f"  {name}: {len(evs) / dt:.0f} events/s", flush=True)

            async def stream(evs: list[fb.FeedbackEvent]) -> int:
                return (await a.submit_stream(evs)).accepted

            async def chunks(evs: list[fb.FeedbackEvent]) -> int:
                return (await a.submit_chunks(evs, chunk_events=1000)).accepted

            async def batched(evs: list[fb.FeedbackEvent]) -> int:
                sem = asyncio.Semaphore(4)

                async def one(chunk: list[fb.FeedbackEvent]) -> int:
                    async with sem:
                        return (await a.submit(chunk)).accepted

                return sum(await asyncio.gather(*(one(evs[i : i + 500]) for i in range(0, len(evs), 500))))

            runs = []
            for _ in range(3):  # the fast path's figure is the headline: the median of 3
                await timed("submit_chunks_events_per_s", events_for(eids, n), chunks)
                runs.append(out["submit_chunks_events_per_s"])
            out["submit_chunks_runs"] = runs
            out["submit_chunks_events_per_s"] = sorted(runs)[1]
            await timed("submit_stream_events_per_s", events_for(eids, n), stream)
            await timed("submit_batched_events_per_s", events_for(eids, n), batched)
            await timed("pref_submit_chunks_events_per_s", preference_events(n_pref), chunks)
            await timed("pref_submit_stream_events_per_s", preference_events(n_pref), stream)
        return out
    finally:
        proc.terminate()
        proc.wait(30)


async def logging_cost(data_dir: Path, seconds: float) -> dict:
    out = {}
    for on in (False, True, False, True):  # interleaved, so drift in machine load hits both
        port, mport = free_ports(2)
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


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [
        ("log append\n(in process)", "raw", "raw_pref"),
        ("SubmitChunks\n(writer process)", "submit_chunks_events_per_s", "pref_submit_chunks_events_per_s"),
        ("SubmitChunks\n(--no-ingest-\nprocess)", "thread_submit_chunks", "thread_pref_submit_chunks"),
        ("SubmitStream\n(1/msg)", "submit_stream_events_per_s", "pref_submit_stream_events_per_s"),
        ("Submit x500\n(4 callers)", "submit_batched_events_per_s", None),
    ]
    backends = list(result["backends"])
    fig, axes = plt.subplots(1, len(backends), figsize=(7 * len(backends), 4), squeeze=False)
    for ax, name in zip(axes[0], backends, strict=True):
        b = result["backends"][name]
        vals = {
            **b["service"],
            "raw": b["raw_in_process"]["events_per_s"],
            "raw_pref": b["raw_pref"]["events_per_s"],
            "thread_submit_chunks": b["service_in_thread"]["submit_chunks_events_per_s"],
            "thread_pref_submit_chunks": b["service_in_thread"]["pref_submit_chunks_events_per_s"],
        }
        xs = range(len(paths))
        ax.bar([x - 0.2 for x in xs], [vals[c] / 1000 for _, c, _ in paths], 0.4, label="label corrections")
        ax.bar([x + 0.2 for x in xs], [vals[p] / 1000 if p else 0 for _, _, p in paths], 0.4, label="text preferences")
        ax.set_xticks(list(xs), [label for label, _, _ in paths], fontsize=8)
        ax.set_ylabel("durable events/s (thousands)")
        ax.set_title(f"{name}: one client, acknowledged = committed")
        ax.legend(fontsize=8)
    fig.suptitle(result["machine"]["cpu"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--pref-events", type=int, default=60_000)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    ap.add_argument("--no-logging-cost", action="store_true", help="skip part 2 (decision logging on vs off)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    real = ModelStore(REPO / ".loopserve" / "store")
    provision.pull(real, models=["annotator"])
    result: dict = {
        "machine": {"cpu": cpu_model(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "load_average_at_start": list(os.getloadavg()),
        "backends": {},
    }
    pg_ctx = postgres_server() if "postgres" in args.backends else contextlib.nullcontext("")
    with tempfile.TemporaryDirectory() as tmp, pg_ctx as pg:
        data = Path(tmp)
        v = real.latest("annotator")
        assert v
        ModelStore(data / "store").publish_version("annotator", real.path("annotator", v))
        ensure_token_file(data / "tokens.json")
        urls = {
            "sqlite": lambda: str(data / f"log-{uuid.uuid4().hex[:6]}.sqlite3"),
            "postgres": lambda: create_schema(pg, f"bench_{uuid.uuid4().hex[:8]}"),
        }
        result["grpc_floor"] = await grpc_floor(args.events)
        for name in args.backends:
            make_url = urls[name]
            print(f"{name}:", flush=True)
            raw = raw_rate(make_url(), args.events)
            raw_pref = raw_rate(make_url(), args.pref_events, "preferences")
            print(f"  log append: {raw['events_per_s']:.0f}/s, preferences {raw_pref['events_per_s']:.0f}/s")
            print("  service, committing in its writer process:", flush=True)
            svc = await through_service(data, make_url(), args.events, args.pref_events)
            print("  service, committing on a thread (--no-ingest-process):", flush=True)
            svc_thread = await through_service(
                data, make_url(), args.events, args.pref_events, flags=("--no-ingest-process",)
            )
            result["backends"][name] = {
                "raw_in_process": raw,
                "raw_pref": raw_pref,
                "service": svc,
                "service_in_thread": svc_thread,
                "submit_chunks_vs_append": svc["submit_chunks_events_per_s"] / raw["events_per_s"],
                "pref_submit_chunks_vs_append": svc["pref_submit_chunks_events_per_s"] / raw_pref["events_per_s"],
                "in_thread_submit_chunks_vs_append": svc_thread["submit_chunks_events_per_s"] / raw["events_per_s"],
            }
        if not args.no_logging_cost:
            result["decision_logging"] = await logging_cost(data, args.seconds)
        elif (args.out / "ingest.json").exists():  # keep the earlier figures, marked as such
            earlier = json.loads((args.out / "ingest.json").read_text()).get("decision_logging")
            if earlier:
                result["decision_logging"] = {**earlier, "from_an_earlier_run": True}
    result["targets"] = {
        "sqlite_stream_events_per_s": 50_000,
        "stream_vs_append": 0.8,
        "postgres_stream_events_per_s": 30_000,
        "pref_stream_events_per_s": 50_000,
        "decision_logging_cost_fraction": 0.10,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ingest.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "ingest.png")
    print(json.dumps({k: v for k, v in result.items() if k != "targets"}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
