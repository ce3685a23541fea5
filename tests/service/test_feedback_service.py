"""FeedbackService and decision logging over real gRPC, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio
from prometheus_client import REGISTRY

from loopserve.auth import ensure_token_file, read_token
from loopserve.client import AsyncClient, ChunkedSubmission, Client, RetryPolicy, wait_until_serving
from loopserve.config import PolicyConfig
from loopserve.feedback.v1 import feedback_pb2 as fb
from loopserve.feedback_log import open_feedback_log
from loopserve.ports import free_port
from policy_service.app import PolicyApp
from tests.support.pg_server import create_schema, postgres_server
from tests.support.waiting import kill9_and_reap, wait_until, wait_until_async

NO_RETRY = RetryPolicy(attempts=1)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def log_url(request: pytest.FixtureRequest, tiny_data_dir: Path) -> str:
    if request.param == "sqlite":
        return str(tiny_data_dir / "feedback.sqlite3")
    return create_schema(request.getfixturevalue("pg_url"), f"svc_{uuid.uuid4().hex[:10]}")


class Svc:
    def __init__(self, app: PolicyApp) -> None:
        self.app = app
        self.target = f"127.0.0.1:{app.port}"

    def client(self, role: str) -> AsyncClient:
        return AsyncClient(self.target, read_token(self.app.cfg.token_path, role), retry=NO_RETRY)


@pytest.fixture
async def svc(tiny_data_dir: Path, log_url: str) -> AsyncIterator[Svc]:
    cfg = PolicyConfig(data_dir=tiny_data_dir, log_url=log_url, port=0, metrics_port=-1, max_new_tokens_cap=16)
    app = PolicyApp(cfg)
    await app.start(watch=False)
    yield Svc(app)
    await app.stop(1)


def key() -> str:
    return uuid.uuid4().hex


def correction(event_id: str, label: str, k: str | None = None) -> fb.FeedbackEvent:
    return fb.FeedbackEvent(
        idempotency_key=k or key(),
        annotator_id="ann-1",
        correction=fb.LabelCorrection(event_id=event_id, label=label),
    )


async def _fails(coro: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(aio.AioRpcError) as e:
        await coro  # type: ignore[misc]
    return e.value.code(), e.value.details() or ""


async def test_served_label_and_correction_read_back_joined(svc: Svc) -> None:
    async with svc.client("client") as c, svc.client("annotator") as a:
        served = (await c.annotate([("item-1", "the tea was fine")])).annotations[0]
        r = await a.submit([correction(served.event_id, "great")])
        assert r.accepted == 1 and r.results[0].seq > 0
    recs = svc.app.feedback_log.log.read(0, 100)
    fb_rec = next(x for x in recs if x.type == "feedback")
    d = fb_rec.served
    assert d is not None and d.event_id == served.event_id
    assert d.model_version == "v0" and d.model == "annotator"
    assert d.output[0][0] == served.labels[0].label
    # The probability with which the served label was chosen: without exploration the argmax always is.
    assert d.propensity == 1.0
    assert fb_rec.feedback is not None and fb_rec.feedback.label == "great"


async def test_generation_decisions_and_preferences(svc: Svc) -> None:
    async with svc.client("client") as c, svc.client("annotator") as a:
        g = await c.generate("Write a review", n=2, max_new_tokens=4, seed=1)
        e1, e2 = (x.event_id for x in g.completions)
        ok = await a.submit(
            [
                fb.FeedbackEvent(
                    idempotency_key=key(), preference=fb.Preference(chosen_event_id=e1, rejected_event_id=e2)
                )
            ]
        )
        assert ok.accepted == 1
        code, details = await _fails(
            a.submit(
                [
                    fb.FeedbackEvent(
                        idempotency_key=key(),
                        preference=fb.Preference(chosen_event_id=e1, rejected_event_id=e1),
                    )
                ]
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        other = (await c.generate("A different prompt", max_new_tokens=2)).completions[0].event_id
        code, details = await _fails(
            a.submit(
                [
                    fb.FeedbackEvent(
                        idempotency_key=key(),
                        preference=fb.Preference(chosen_event_id=e1, rejected_event_id=other),
                    )
                ]
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in details
        code, _ = await _fails(a.submit([correction(e1, "great")]))
        assert code == grpc.StatusCode.FAILED_PRECONDITION  # a label correction on a generation
        texts = await a.submit(
            [fb.FeedbackEvent(idempotency_key=key(), preference=fb.Preference(prompt="p", chosen="a", rejected="b"))]
        )
        assert texts.accepted == 1  # carries its own texts: no event_id needed


async def test_bad_feedback_gets_clear_status_and_the_server_keeps_serving(svc: Svc) -> None:
    async with svc.client("client") as c, svc.client("annotator") as a:
        eid = (await c.annotate(["ok"])).annotations[0].event_id
        cases = [
            ([correction("no-such-event", "great")], grpc.StatusCode.NOT_FOUND),
            ([correction(eid, "purple")], grpc.StatusCode.INVALID_ARGUMENT),
            (
                [
                    fb.FeedbackEvent(
                        idempotency_key=key(),
                        rating=fb.Rating(event_id=eid, value=math.nan, scale_min=1, scale_max=5),
                    )
                ],
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            (
                [
                    fb.FeedbackEvent(
                        idempotency_key=key(),
                        rating=fb.Rating(event_id=eid, value=9, scale_min=1, scale_max=5),
                    )
                ],
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            ([fb.FeedbackEvent(idempotency_key=key())], grpc.StatusCode.INVALID_ARGUMENT),  # no kind
            (
                [fb.FeedbackEvent(accept=fb.LabelAccept(event_id=eid))],
                grpc.StatusCode.INVALID_ARGUMENT,
            ),  # no key
            ([], grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for events, want in cases:
            code, details = await _fails(a.submit(events))
            assert code == want, (events, details)
            assert details
        # A mixed batch answers per event and stores only the good one.
        r = await a.submit([correction(eid, "great"), correction("nope", "great")])
        assert [x.accepted for x in r.results] == [True, False]
        assert r.results[1].code == "NOT_FOUND" and "nope" in r.results[1].reason
        # Clients cannot submit feedback; annotators can.
        code, _ = await _fails(c.submit([correction(eid, "great")]))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert (await c.annotate(["still serving"])).annotations


async def test_repeated_idempotency_key_is_acknowledged_once(svc: Svc) -> None:
    async with svc.client("client") as c, svc.client("annotator") as a:
        eid = (await c.annotate(["ok"])).annotations[0].event_id
        k = key()
        first = await a.submit([correction(eid, "great", k)])
        again = await a.submit([correction(eid, "great", k)])
        assert again.results[0].accepted and again.results[0].duplicate
        assert again.results[0].seq == first.results[0].seq
    assert svc.app.feedback_log.log.stats().feedback == 1


async def test_submit_stream_summary(svc: Svc) -> None:
    async with svc.client("client") as c, svc.client("annotator") as a:
        eids = [x.event_id for x in (await c.annotate([f"item {i}" for i in range(20)])).annotations]
        events = [correction(eids[i % 20], "great" if i % 2 else "other") for i in range(5000)]
        events.append(correction("missing", "great"))
        events.append(events[0])  # a repeat
        s = await a.submit_stream(events, timeout_s=120)
        assert s.received == 5002 and s.accepted == 5001 and s.rejected == 1 and s.duplicates == 1
        assert s.rejections[0].code == "NOT_FOUND" and s.rejections[0].index == 5000
    assert svc.app.feedback_log.log.stats().feedback == 5000


async def test_full_decision_buffer_is_resource_exhausted(tiny_data_dir: Path) -> None:
    cfg = PolicyConfig(data_dir=tiny_data_dir, port=0, metrics_port=-1, decision_buffer=4, generator=False)
    app = PolicyApp(cfg)
    await app.start(watch=False)
    try:
        async with Svc(app).client("client") as c:
            code, details = await _fails(c.annotate([f"t{i}" for i in range(5)]))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "decision log" in details
            assert (await c.annotate(["fits"])).annotations
    finally:
        await app.stop(1)


# ---- durability: kill -9 -------------------------------------------------------------------------


def _start(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loopserve",
            "policy",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--metrics-port",
            "-1",
            "--no-generator",
            "--log-level",
            "WARNING",
            "--watch-interval-s",
            "60",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _wait_ready(target: str, token: str) -> None:
    wait_until_serving(target, timeout_s=120)


@pytest.mark.slow
def test_acknowledged_feedback_survives_kill_9(tiny_data_dir: Path) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    ensure_token_file(tiny_data_dir / "tokens.json")
    proc = _start(tiny_data_dir, port)
    try:
        _wait_ready(target, read_token(tiny_data_dir / "tokens.json", "client"))
        with Client(target, read_token(tiny_data_dir / "tokens.json", "client")) as c:
            eids = [a.event_id for a in c.annotate([f"review {i}" for i in range(100)]).annotations]
        events = [correction(eids[i % 100], "great", f"k{i:05d}") for i in range(10_000)]
        acked: list[str] = []
        errors: list[grpc.StatusCode] = []

        def send() -> None:
            with Client(target, read_token(tiny_data_dir / "tokens.json", "annotator"), retry=NO_RETRY) as a:
                for start in range(0, len(events), 250):
                    try:
                        r = a.submit(events[start : start + 250], timeout_s=10)
                    except grpc.RpcError as e:
                        errors.append(e.code())
                        return
                    acked.extend(x.idempotency_key for x in r.results if x.accepted)

        t = threading.Thread(target=send)
        t.start()
        wait_until(lambda: len(acked) >= 2000 or not t.is_alive(), 120, "2,000 acknowledged events")
        kill9_and_reap(proc)
        t.join(30)
        assert acked, "nothing was acknowledged before the kill"
        log = open_feedback_log(str(tiny_data_dir / "feedback.sqlite3"))
        stored = [r.record.idempotency_key for r in _all(log) if r.type == "feedback"]  # type: ignore[union-attr]
        log.close()
        assert set(acked) <= set(stored), "an acknowledged event was lost"
        assert len(stored) == len(set(stored)), "an event was stored twice"

        # Restart and send everything again through SubmitStream: each key ends up exactly once.
        proc = _start(tiny_data_dir, port)
        _wait_ready(target, read_token(tiny_data_dir / "tokens.json", "client"))
        with Client(target, read_token(tiny_data_dir / "tokens.json", "annotator"), timeout_s=300) as a:
            s = a.submit_stream(events)
        assert s.accepted == 10_000 and s.rejected == 0
        assert s.duplicates >= len(acked)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    log = open_feedback_log(str(tiny_data_dir / "feedback.sqlite3"))
    stored = [r.record.idempotency_key for r in _all(log) if r.type == "feedback"]  # type: ignore[union-attr]
    log.close()
    assert len(stored) == 10_000 and len(set(stored)) == 10_000


@pytest.mark.slow
def test_submit_chunks_acknowledged_survive_kill_9_and_the_tail_is_resent_once(tiny_data_dir: Path) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    ensure_token_file(tiny_data_dir / "tokens.json")
    tokens = tiny_data_dir / "tokens.json"
    proc = _start(tiny_data_dir, port)
    try:
        _wait_ready(target, read_token(tokens, "client"))
        with Client(target, read_token(tokens, "client")) as c:
            eids = [a.event_id for a in c.annotate([f"review {i}" for i in range(100)]).annotations]
        events = [correction(eids[i % 100], "great", f"c{i:05d}") for i in range(10_000)]
        chunks = [_chunk(events[i : i + 250]) for i in range(0, len(events), 250)]
        acked: list[str] = []
        killed = threading.Event()

        def send() -> None:
            def stream() -> Iterator[fb.SubmitRequest]:
                yield from chunks[:12]
                killed.wait(60)  # hold the stream open, the tail unsent, until the server is gone

            with Client(target, read_token(tokens, "annotator"), retry=NO_RETRY) as a:
                try:
                    for ack in a.feedback.SubmitChunks(stream(), metadata=a.metadata, timeout=60):
                        acked.extend(e.idempotency_key for e in chunks[ack.chunk].events)
                except grpc.RpcError:
                    pass

        t = threading.Thread(target=send)
        t.start()
        wait_until(lambda: len(acked) >= 2000 or not t.is_alive(), 120, "2,000 acknowledged events")
        kill9_and_reap(proc)  # the service and its feedback writer: the log holds still from here on
        killed.set()
        t.join(30)
        assert acked, "nothing was acknowledged before the kill"
        log = open_feedback_log(str(tiny_data_dir / "feedback.sqlite3"))
        stored = [r.record.idempotency_key for r in _all(log) if r.type == "feedback"]  # type: ignore[union-attr]
        log.close()
        assert set(acked) <= set(stored), "an acknowledged event was lost"
        assert len(stored) == len(set(stored)), "an event was stored twice"

        proc = _start(tiny_data_dir, port)
        _wait_ready(target, read_token(tokens, "client"))
        with Client(target, read_token(tokens, "annotator"), timeout_s=300) as a:
            s = a.submit_chunks(events, chunk_events=500)
        assert s.accepted == 10_000 and s.rejected == 0 and s.duplicates == len(stored)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    log = open_feedback_log(str(tiny_data_dir / "feedback.sqlite3"))
    stored = [r.record.idempotency_key for r in _all(log) if r.type == "feedback"]  # type: ignore[union-attr]
    log.close()
    assert sorted(stored) == sorted(e.idempotency_key for e in events)


def _all(log):  # type: ignore[no-untyped-def]
    out, cursor = [], 0
    while True:
        batch = log.read(cursor, 5000)
        if not batch:
            return out
        out.extend(batch)
        cursor = batch[-1].seq


# ---- SubmitChunks: the bidirectional bulk path ------------------------------------------------------


def _chunk(events: list[fb.FeedbackEvent]) -> fb.SubmitRequest:
    return fb.SubmitRequest(events=events)


async def test_submit_chunks_acks_each_chunk_in_order_once_durable(svc: Svc) -> None:
    async with svc.client("client") as c, svc.client("annotator") as a:
        eids = [x.event_id for x in (await c.annotate([f"item {i}" for i in range(20)])).annotations]
        events = [correction(eids[i % 20], "great" if i % 2 else "other") for i in range(3000)]
        chunks = [_chunk(events[i : i + 1000]) for i in range(0, 3000, 1000)]
        acks = []
        async for ack in a.feedback.SubmitChunks(iter(chunks), metadata=a.metadata, timeout=60):
            # Each ack means its chunk is in the log: readable before the stream goes on.
            assert svc.app.feedback_log.log.stats().feedback >= 1000 * (ack.chunk + 1)
            acks.append(ack)
        assert [(k.chunk, k.accepted, k.rejected, k.duplicates) for k in acks] == [(i, 1000, 0, 0) for i in range(3)]

        # The client helper: rejections, duplicates and a key conflict, indexed in the whole submission.
        conflict = correction(eids[0], "other", events[1].idempotency_key)  # events[1] said "great"
        more = [correction(eids[i % 20], "great") for i in range(1500)]
        more += [correction("missing", "great"), events[0], conflict, fb.FeedbackEvent(idempotency_key=key())]
        s = await a.submit_chunks(more, chunk_events=700, timeout_s=120)
        assert (s.received, s.accepted, s.rejected, s.duplicates) == (1504, 1502, 2, 2)
        assert [(r.index, r.code) for r in s.rejections] == [(1500, "NOT_FOUND"), (1503, "INVALID_ARGUMENT")]
    assert svc.app.feedback_log.log.stats().feedback == 4500


async def test_submit_chunks_bad_chunk_ends_the_stream_after_answering_the_good_ones(svc: Svc) -> None:
    async with svc.client("client") as c, svc.client("annotator") as a, svc.client("annotator") as other:
        eid = (await c.annotate(["item"])).annotations[0].event_id
        good = [_chunk([correction(eid, "great") for _ in range(50)]) for _ in range(2)]
        for bad, says in (
            (fb.SubmitRequest(), "chunk 2 is empty"),
            (_chunk([correction(eid, "great")] * 10_001), "chunk 2 holds 10001 events; the limit is 10000"),
        ):
            got: list[fb.ChunkAck] = []

            async def send(chunks: list[fb.SubmitRequest], into: list[fb.ChunkAck], who: AsyncClient) -> None:
                async for ack in who.feedback.SubmitChunks(iter(chunks), metadata=who.metadata, timeout=60):
                    into.append(ack)

            # Another client's stream beside the bad one is not disturbed.
            theirs: list[fb.ChunkAck] = []
            fine = [_chunk([correction(eid, "other") for _ in range(100)]) for _ in range(3)]
            code, details = (None, "")
            try:
                await asyncio.gather(send([*good, bad, *good], got, a), send(fine, theirs, other))
            except aio.AioRpcError as e:
                code, details = e.code(), e.details() or ""
            assert code == grpc.StatusCode.INVALID_ARGUMENT and says in details, (code, details)
            assert [k.accepted for k in got] == [50, 50]  # the chunks before the bad one are answered
            while len(theirs) < 3:  # gather re-raised before the other stream ended: it still finishes
                await asyncio.sleep(0.05)
            assert [k.accepted for k in theirs] == [100, 100, 100]
            good = [_chunk([correction(eid, "great") for _ in range(50)]) for _ in range(2)]
    assert svc.app.feedback_log.log.stats().feedback == 2 * 100 + 2 * 300


async def test_submit_chunks_resends_only_the_unacknowledged_tail(svc: Svc) -> None:
    async with svc.client("client") as c, svc.client("annotator") as a:
        eid = (await c.annotate(["item"])).annotations[0].event_id
        events = [correction(eid, "great") for _ in range(2000)]
        sub = ChunkedSubmission(events, 250)
        call = a.feedback.SubmitChunks(sub.unacked(), metadata=a.metadata, timeout=60)
        async for ack in call:
            sub.absorb(ack, 0)
            if sub.acked == 3:
                call.cancel()  # the stream is lost with 3 of 8 chunks acknowledged
                break
        assert sub.acked == 3 and len(list(sub.unacked())) == 5
        first, resent = sub.acked, 0
        async for ack in a.feedback.SubmitChunks(sub.unacked(), metadata=a.metadata, timeout=60):
            sub.absorb(ack, first)
            resent += 1
        assert sub.done and resent == 5 and sub.summary.accepted == 2000
    # A chunk committed after the cancel but never acknowledged came back as duplicates: stored once.
    keys = [r.record.idempotency_key for r in _all(svc.app.feedback_log.log) if r.type == "feedback"]  # type: ignore[union-attr]
    assert sorted(keys) == sorted(e.idempotency_key for e in events)
    assert sub.summary.duplicates == 0 or sub.summary.duplicates % 250 == 0


async def test_submit_chunks_cuts_long_texts_into_messages_the_server_takes(svc: Svc) -> None:
    big = "word " * 20_000  # 100,000 characters
    events = [
        fb.FeedbackEvent(
            idempotency_key=key(), preference=fb.Preference(prompt=f"p{i} {big}", chosen=f"a {big}", rejected=big)
        )
        for i in range(24)
    ]
    events.append(
        fb.FeedbackEvent(idempotency_key=key(), preference=fb.Preference(prompt="p", chosen="x", rejected="x"))
    )
    sub = ChunkedSubmission(events, 1000)
    assert len(sub.chunks) > 1 and all(c.ByteSize() <= 4 * 1024 * 1024 + 1024 for c in sub.chunks)
    async with svc.client("annotator") as a:
        s = await a.submit_chunks(events, timeout_s=120)
    assert (s.accepted, s.rejected) == (24, 1)
    assert s.rejections[0].index == 24 and s.rejections[0].code == "INVALID_ARGUMENT"
    assert svc.app.feedback_log.log.stats().feedback == 24


def _writer_processes() -> list[int]:
    import psutil

    return [
        p.pid
        for p in psutil.Process().children()
        if p.status() != psutil.STATUS_ZOMBIE and "loopserve.feedback_log.commit_process" in " ".join(p.cmdline())
    ]


@pytest.mark.parametrize("ingest_process", [True, False], ids=["ingest-process", "no-ingest-process"])
async def test_ingest_process_decides_where_feedback_commits(tiny_data_dir: Path, ingest_process: bool) -> None:
    """`--ingest-process` (the default) commits in a writer process of the service's own; off, on a
    thread of the service. Either way an acknowledged event is stored, and nothing outlives the service."""
    before = set(_writer_processes())
    cfg = PolicyConfig(data_dir=tiny_data_dir, port=0, metrics_port=-1, ingest_process=ingest_process)
    app = PolicyApp(cfg)
    await app.start(watch=False)
    try:
        writers = set(_writer_processes()) - before
        assert len(writers) == (1 if ingest_process else 0)
        svc = Svc(app)
        async with svc.client("client") as c, svc.client("annotator") as a:
            served = (await c.annotate([("item-1", "the tea was fine")])).annotations[0]
            summary = await a.submit_chunks([correction(served.event_id, "great") for _ in range(3)], chunk_events=2)
        assert summary.accepted == 3
        assert sum(r.type == "feedback" for r in app.feedback_log.log.read(0, 100)) == 3
        # The committer answers a batch's callers, then stops counting its events as in flight: a scrape
        # between the two reads them (a clean-clone run read 1.0 right after the acknowledgement).
        depth = {"queue": "feedback"}
        await wait_until_async(lambda: REGISTRY.get_sample_value("loopserve_queue_depth", depth) == 0, 10, "depth 0")
    finally:
        await app.stop(1)
    wait_until(lambda: not (set(_writer_processes()) & writers), 10, "the writer process to exit with the service")
