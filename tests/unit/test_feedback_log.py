"""The feedback log's contract, run against both backends (SQLite file, private PostgreSQL server).

What a user of the log would notice: one order for decisions and feedback, feedback joined to what was
served, a repeated key never stored twice, rejections that say what to fix, followers that wake up,
export/import without duplicates, back-pressure instead of unbounded queues, and no acknowledged event
lost when the writing process is killed.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from loopserve.errors import InvalidArgument, ResourceExhausted, Unavailable
from loopserve.feedback_log import (
    Decision,
    DecisionWriter,
    Feedback,
    FeedbackCommitter,
    FeedbackLog,
    open_feedback_log,
    validate_decision,
)
from loopserve.feedback_log.commit_process import ProcessCommitter
from tests.support.pg_server import create_database, create_schema, postgres_server
from tests.support.waiting import wait_until

LABELS = {"sentiment": ["great", "other"]}
SECRET = "user text that must never reach a log line"


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_url():
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request) -> str:
    return request.param


@pytest.fixture
def new_log_url(backend, tmp_path, request):
    """A factory for URLs of fresh, empty logs on the parametrised backend."""

    def make() -> str:
        if backend == "sqlite":
            return str(tmp_path / f"feedback-{uuid.uuid4().hex[:8]}.sqlite")
        return create_schema(request.getfixturevalue("pg_url"), f"log_{uuid.uuid4().hex[:12]}")

    return make


@pytest.fixture
def log_url(new_log_url) -> str:
    return new_log_url()


@pytest.fixture
def log(log_url):
    log = open_feedback_log(log_url)
    yield log
    log.close()


def label_decision(event_id: str, *, top: str = "great", p: float = 0.8, version: str = "v1", **kw) -> Decision:
    other = "other" if top == "great" else "great"
    return Decision(
        event_id=event_id,
        task="sentiment",
        kind="label",
        input_text=kw.pop("text", f"{SECRET} (item {event_id})"),
        output=[(top, p), (other, 1 - p)],
        propensity=p,
        propensity_kind="prob",
        model="annotator",
        model_version=version,
        client_id="app-1",
        **kw,
    )


def generation(event_id: str, *, prompt: str = "Say hello", completion: str = "Hello!", version: str = "v1"):
    return Decision(
        event_id=event_id,
        task="chat",
        kind="generation",
        input_text=prompt,
        output=completion,
        propensity=-4.25,
        propensity_kind="logprob",
        model="generator",
        model_version=version,
    )


def key() -> str:
    return uuid.uuid4().hex


class WrappedLog:
    """Delegates to a real log; tests override single methods to block or fail."""

    def __init__(self, inner: FeedbackLog) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# ---- order, joins, idempotency -------------------------------------------------------------------


def test_decisions_and_feedback_read_back_in_one_seq_order(log):
    log.append_decisions([label_decision("d1"), label_decision("d2")])
    [r1] = log.append_feedback([Feedback("accept", key(), event_id="d1")], LABELS)
    log.append_decisions([generation("g1")])
    [r2] = log.append_feedback([Feedback("rating", key(), event_id="g1", value=4, scale_min=1, scale_max=5)], {})

    records = log.read(after_seq=0, limit=100)
    assert [(r.type, getattr(r.record, "event_id", "")) for r in records] == [
        ("decision", "d1"),
        ("decision", "d2"),
        ("feedback", "d1"),
        ("decision", "g1"),
        ("feedback", "g1"),
    ]
    seqs = [r.seq for r in records]
    assert seqs == sorted(set(seqs))
    assert (r1.seq, r2.seq) == (seqs[2], seqs[4])
    assert log.max_seq() == seqs[-1]
    # A cursor resumes exactly where it left off.
    assert [r.seq for r in log.read(after_seq=seqs[1], limit=2)] == seqs[2:4]
    assert log.read(after_seq=seqs[-1]) == []
    assert set(log.get_decisions(["d2", "g1", "nope"])) == {"d2", "g1"}


def test_correction_joins_served_label_propensity_and_model_version(log):
    log.append_decisions([label_decision("d1", top="great", p=0.73, version="v7")])
    results = log.append_feedback(
        [
            Feedback("correction", key(), event_id="d1", label="other", annotator_id="ann-3"),
            Feedback("reject", key(), event_id="d1"),  # empty label: the served one
        ],
        LABELS,
    )
    assert [r.accepted for r in results] == [True, True]

    decision_rec, correction_rec, reject_rec = log.read()
    served = correction_rec.served
    assert correction_rec.feedback.label == "other"
    assert (served.top_label, served.propensity, served.propensity_kind) == ("great", 0.73, "prob")
    assert served.model_version == "v7"
    assert reject_rec.feedback.label == "great", "the stored reject names the label it judged"
    assert [f.kind for f in decision_rec.joined_feedback] == ["correction", "reject"]


def test_preference_joins_both_generations(log):
    log.append_decisions([generation("a", completion="Hi!"), generation("b", completion="Go away")])
    [res] = log.append_feedback([Feedback("preference", key(), chosen_event_id="a", rejected_event_id="b")], {})
    assert res.accepted
    pref = log.read()[-1]
    assert [d.output for d in pref.joined_decisions] == ["Hi!", "Go away"]


def test_repeated_idempotency_key_is_acknowledged_and_stored_once(log):
    log.append_decisions([label_decision("d1")])
    k = key()
    [first] = log.append_feedback([Feedback("accept", k, event_id="d1")], LABELS)
    again = log.append_feedback([Feedback("accept", k, event_id="d1"), Feedback("accept", k, event_id="d1")], LABELS)
    assert first.accepted and not first.duplicate
    assert all(r.accepted and r.duplicate and r.seq == first.seq for r in again)

    k2 = key()
    within = log.append_feedback([Feedback("accept", k2, event_id="d1"), Feedback("accept", k2, event_id="d1")], LABELS)
    assert [r.duplicate for r in within] == [False, True]
    assert within[0].seq == within[1].seq

    stored = [r.feedback.idempotency_key for r in log.read() if r.type == "feedback"]
    assert Counter(stored) == {k: 1, k2: 1}


def test_a_second_process_sees_the_same_keys(log, log_url):
    """The UNIQUE key holds across processes/replicas: another connection's repeat is a duplicate."""
    log.append_decisions([label_decision("d1")])
    k = key()
    [first] = log.append_feedback([Feedback("accept", k, event_id="d1")], LABELS)
    with open_feedback_log(log_url) as replica:
        [again] = replica.append_feedback([Feedback("accept", k, event_id="d1")], LABELS)
    assert again.duplicate and again.seq == first.seq
    assert log.stats().feedback == 1


# ---- validation ----------------------------------------------------------------------------------

nan, inf = math.nan, math.inf
REJECTIONS = {
    "empty key": (Feedback("accept", "", event_id="lab"), "INVALID_ARGUMENT", "idempotency_key is empty"),
    "blank key": (Feedback("accept", "  ", event_id="lab"), "INVALID_ARGUMENT", "idempotency_key is empty"),
    "unknown label": (
        Feedback("correction", "k", event_id="lab", label="meh"),
        "INVALID_ARGUMENT",
        "unknown label 'meh' for task 'sentiment'",
    ),
    "correction without label": (
        Feedback("correction", "k", event_id="lab"),
        "INVALID_ARGUMENT",
        "right label",
    ),
    "rating NaN": (
        Feedback("rating", "k", event_id="gen1", value=nan, scale_min=1, scale_max=5),
        "INVALID_ARGUMENT",
        "finite",
    ),
    "rating inf": (
        Feedback("rating", "k", event_id="gen1", value=inf, scale_min=1, scale_max=5),
        "INVALID_ARGUMENT",
        "finite",
    ),
    "rating off scale": (
        Feedback("rating", "k", event_id="gen1", value=6, scale_min=1, scale_max=5),
        "INVALID_ARGUMENT",
        "outside its declared scale",
    ),
    "rating reversed scale": (
        Feedback("rating", "k", event_id="gen1", value=3, scale_min=5, scale_max=1),
        "INVALID_ARGUMENT",
        "scale_min (5.0) must be below scale_max (1.0)",
    ),
    "rating without scale": (
        Feedback("rating", "k", event_id="gen1", value=0),
        "INVALID_ARGUMENT",
        "must be below scale_max",
    ),
    "unknown event": (Feedback("accept", "k", event_id="nope"), "NOT_FOUND", "unknown event_id 'nope'"),
    "preference unknown events": (
        Feedback("preference", "k", chosen_event_id="gen1", rejected_event_id="nope"),
        "NOT_FOUND",
        "unknown event_id 'nope'",
    ),
    "preference with itself": (
        Feedback("preference", "k", chosen_event_id="gen1", rejected_event_id="gen1"),
        "INVALID_ARGUMENT",
        "with itself",
    ),
    "preference identical texts": (
        Feedback("preference", "k", prompt="p", chosen="same", rejected="same"),
        "INVALID_ARGUMENT",
        "identical",
    ),
    "preference different prompts": (
        Feedback("preference", "k", chosen_event_id="gen1", rejected_event_id="gen3"),
        "INVALID_ARGUMENT",
        "different prompts",
    ),
    "preference half given": (
        Feedback("preference", "k", chosen_event_id="gen1"),
        "INVALID_ARGUMENT",
        "needs chosen_event_id and rejected_event_id",
    ),
    "accept with a label on generation": (
        Feedback("accept", "k", event_id="gen1", label="great"),
        "INVALID_ARGUMENT",
        "takes no label",
    ),
    "correction on generation": (
        Feedback("correction", "k", event_id="gen1", label="great"),
        "FAILED_PRECONDITION",
        "is a generation",
    ),
    "edit on label": (
        Feedback("edit", "k", event_id="lab", text="better"),
        "FAILED_PRECONDITION",
        "edit applies to generations",
    ),
    "edit without text": (Feedback("edit", "k", event_id="gen1"), "INVALID_ARGUMENT", "edit text is empty"),
    "unknown kind": (Feedback("like", "k", event_id="lab"), "INVALID_ARGUMENT", "kind must be one of"),  # type: ignore[arg-type]
    "NUL in id": (Feedback("accept", "k\x00", event_id="lab"), "INVALID_ARGUMENT", "NUL"),
}


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_invalid_feedback_is_rejected_with_an_actionable_reason(log, case):
    log.append_decisions(
        [
            label_decision("lab"),
            generation("gen1", prompt="Say hello", completion="Hi"),
            generation("gen2", prompt="Say hello", completion="Go away"),
            generation("gen3", prompt="Say goodbye", completion="Bye"),
        ]
    )
    bad, code, reason = REJECTIONS[case]
    good = Feedback("accept", key(), event_id="lab")
    bad_result, good_result = log.append_feedback([bad, good], LABELS)

    assert (bad_result.accepted, bad_result.code) == (False, code)
    assert reason in bad_result.reason
    assert good_result.accepted, "one bad event does not sink the rest of its batch"
    assert [r.record.idempotency_key for r in log.read() if r.type == "feedback"] == [good.idempotency_key]


def test_accept_and_reject_on_a_generation_are_pointwise_feedback(log):
    log.append_decisions([generation("gen1", prompt="Say hello", completion="Hi")])
    results = log.append_feedback(
        [Feedback("accept", key(), event_id="gen1"), Feedback("reject", key(), event_id="gen1")], LABELS
    )
    assert all(r.accepted for r in results)


def test_preference_carrying_its_own_texts_needs_no_served_events(log):
    log.append_decisions([generation("gen1")])
    results = log.append_feedback(
        [
            Feedback("preference", key(), prompt="Say hi", chosen="Hi!", rejected="No."),
            Feedback(
                "preference",
                key(),
                chosen_event_id="x1",
                rejected_event_id="x2",
                prompt="P",
                chosen="a",
                rejected="b",
            ),
        ],
        {},
    )
    assert all(r.accepted for r in results)
    assert [r.joined_decisions for r in log.read() if r.type == "feedback"] == [(), ()]


def test_label_set_falls_back_to_the_labels_the_decision_ranked(log):
    log.append_decisions([label_decision("lab")])
    ok, bad = log.append_feedback(
        [
            Feedback("correction", key(), event_id="lab", label="other"),
            Feedback("correction", key(), event_id="lab", label="x"),
        ],
        {},
    )
    assert ok.accepted and bad.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"propensity": nan}, "finite"),
        ({"propensity": 1.5}, "[0, 1]"),
        ({"output": []}, "non-empty list"),
        ({"event_id": ""}, "event_id is empty"),
        ({"propensity_kind": "odds"}, "propensity_kind"),
    ],
)
def test_malformed_decisions_are_refused(change, reason):
    with pytest.raises(InvalidArgument, match=re.escape(reason)):
        validate_decision(dataclasses.replace(label_decision("d"), **change))


# ---- reading: follow, stats, export/import -------------------------------------------------------


def test_follow_wakes_up_on_new_rows(log, backend):
    log.append_decisions([label_decision("d1")])
    got: list[Any] = []
    arrived = threading.Event()
    stop = threading.Event()
    # On PostgreSQL poll only every 5 s: a prompt wake-up can then only come from LISTEN/NOTIFY.
    poll = {"poll_s": 5.0, "max_poll_s": 5.0} if backend == "postgres" else {"poll_s": 0.02, "max_poll_s": 0.2}

    def consume() -> None:
        for rec in log.follow(after_seq=0, stop=stop, **poll):
            got.append(rec)
            if len(got) == 3:
                arrived.set()

    follower = threading.Thread(target=consume)
    follower.start()
    try:
        wait_until(lambda: len(got) == 1, 5, "the follower to read d1")
        assert [r.record.event_id for r in got] == ["d1"]
        log.append_decisions([label_decision("d2")])
        log.append_feedback([Feedback("accept", key(), event_id="d2")], LABELS)
        assert arrived.wait(3.0), "follow() did not deliver the new rows"
        assert [r.type for r in got] == ["decision", "decision", "feedback"]
        assert got[2].served.event_id == "d2"
    finally:
        stop.set()
        follower.join(5.0)
    assert not follower.is_alive(), "setting stop ends follow()"


def test_stats_count_kinds_versions_and_review_rate(log):
    log.append_decisions(
        [
            label_decision("a", version="v1", needs_review=True),
            label_decision("b", version="v2"),
            label_decision("c", version="v2"),
            generation("g", version="v9"),
        ]
    )
    log.append_feedback(
        [
            Feedback("accept", key(), event_id="a"),
            Feedback("accept", key(), event_id="b"),
            Feedback("rating", key(), event_id="g", value=1, scale_min=0, scale_max=1),
        ],
        LABELS,
    )
    stats = log.stats()
    assert (stats.decisions, stats.feedback, stats.max_seq) == (4, 3, log.max_seq())
    assert stats.feedback_by_kind == {"accept": 2, "rating": 1}
    assert stats.decisions_by_model_version == {"annotator": {"v1": 1, "v2": 2}, "generator": {"v9": 1}}
    assert stats.review_rate == pytest.approx(1 / 3)


def test_export_import_round_trip_without_duplicates(log, new_log_url, tmp_path):
    log.append_decisions(
        [label_decision("d1", text="naïve café ☕"), generation("g1"), generation("g2", completion="x")]
    )
    log.append_feedback(
        [
            Feedback("correction", key(), event_id="d1", label="other"),
            Feedback("edit", key(), event_id="g1", text="Hello there!\nline two"),
            Feedback("preference", key(), chosen_event_id="g1", rejected_event_id="g2"),
            Feedback("preference", key(), prompt="p", chosen="a", rejected="b"),
        ],
        LABELS,
    )
    path = tmp_path / "log.jsonl"
    assert log.export_jsonl(path) == 7

    with open_feedback_log(new_log_url()) as copy:
        first = copy.import_jsonl(path)
        second = copy.import_jsonl(path)
        assert (first.decisions, first.feedback, first.skipped) == (3, 4, 0)
        assert (second.decisions, second.feedback, second.skipped) == (0, 0, 7)
        original, imported = log.read(), copy.read()
    assert [(r.type, r.record) for r in imported] == [(r.type, r.record) for r in original]
    assert [r.joined_decisions for r in imported] == [r.joined_decisions for r in original]
    # Exporting from a cursor gives only what came after it.
    assert log.export_jsonl(tmp_path / "tail.jsonl", after_seq=original[-2].seq) == 1


def test_import_names_the_bad_line(log, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"seq": 1, "type": "feedback", "record": {"kind": "accept", "idempotency_key": ""}}\n')
    with pytest.raises(InvalidArgument, match="line 1: idempotency_key is empty"):
        log.import_jsonl(path)


# ---- group commit --------------------------------------------------------------------------------


def test_decision_writer_pushes_back_when_full_and_loses_nothing(log):
    gated = WrappedLog(log)
    entered, release = threading.Event(), threading.Event()

    def blocked_append(decisions):
        entered.set()
        assert release.wait(10)
        log.append_decisions(decisions)

    gated.append_decisions = blocked_append
    writer = DecisionWriter(gated, capacity=4, max_batch=2)
    try:
        writer.submit([label_decision("d1"), label_decision("d2")])
        assert entered.wait(5)  # the writer holds d1, d2 in flight
        writer.submit([label_decision("d3")])
        assert writer.pending == 3
        with pytest.raises(ResourceExhausted, match="decision log buffer full"):
            writer.submit([label_decision("d4"), label_decision("d5")])
        assert writer.pending == 3, "a refused submit enqueues none of its decisions"

        release.set()
        assert writer.flush(timeout=10)
        assert writer.pending == 0
        writer.submit([label_decision("d4"), label_decision("d5")])
        assert writer.flush(timeout=10)
    finally:
        release.set()
        writer.close()
    ids = [r.record.event_id for r in log.read()]
    assert sorted(ids) == ["d1", "d2", "d3", "d4", "d5"]


def test_decision_writer_retries_failed_writes_and_logs_no_user_text(log, caplog):
    flaky = WrappedLog(log)
    failures = [RuntimeError(f"disk on fire while writing {SECRET}")] * 2

    def failing_append(decisions):
        if failures:
            raise failures.pop()
        log.append_decisions(decisions)

    flaky.append_decisions = failing_append
    writer = DecisionWriter(flaky, retry_initial_s=0.01)
    with caplog.at_level(logging.DEBUG, logger="loopserve"):
        writer.submit([label_decision("d1"), label_decision("d2")])
        assert writer.flush(timeout=10)
        writer.close()
    assert set(log.get_decisions(["d1", "d2"])) == {"d1", "d2"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("2 decisions" in w and "d1" in w for w in warnings)
    assert not any(SECRET in r.getMessage() for r in caplog.records)


def test_deferred_events_are_built_on_the_committer_and_a_bad_builder_fails_only_its_call(log):
    log.append_decisions([label_decision("d0")])
    committer = FeedbackCommitter(log)
    built_on: list[str] = []

    def make(prefix: str, n: int) -> list[Feedback]:
        built_on.append(threading.current_thread().name)
        return [Feedback("accept", f"{prefix}-{i}", event_id="d0") for i in range(n)]

    def broken() -> list[Feedback]:
        raise RuntimeError("a converter bug")

    # Queued together, so that they can share one transaction: two good calls around two bad ones.
    futures = [
        committer.submit_deferred(3, lambda: make("a", 3), LABELS),
        committer.submit_deferred(2, broken, LABELS),
        committer.submit_deferred(2, lambda: make("short", 1), LABELS),  # builds fewer than announced
        committer.submit_deferred(2, lambda: make("b", 2), LABELS),
    ]
    assert [r.accepted for r in futures[0].result(30)] == [True] * 3
    for bad in futures[1:3]:
        with pytest.raises(Unavailable):
            bad.result(30)
    assert [r.index for r in futures[3].result(30)] == [0, 1]
    committer.close()
    assert set(built_on) == {"feedback-committer"}
    keys = {r.record.idempotency_key for r in log.read(0, 100) if r.type == "feedback"}
    assert keys == {"a-0", "a-1", "a-2", "b-0", "b-1"}


def test_feedback_committer_merges_concurrent_callers_exactly_once(log):
    log.append_decisions([label_decision(f"d{i}") for i in range(8)])
    committer = FeedbackCommitter(log, max_batch=64)
    acked: dict[str, set[int]] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(t: int) -> None:
        try:
            for j in range(40):
                # Own keys, plus a key every thread sends: stored once, the rest are duplicates.
                events = [Feedback("accept", f"t{t}-{j}-{n}", event_id=f"d{t}") for n in range(1 + j % 3)]
                events.append(Feedback("reject", f"shared-{j}", event_id="d0"))
                results = committer.commit(events, LABELS, timeout=30)
                assert [r.idempotency_key for r in results] == [e.idempotency_key for e in events]
                assert [r.index for r in results] == list(range(len(events)))
                with lock:
                    for r in results:
                        assert r.accepted, r.reason
                        acked.setdefault(r.idempotency_key, set()).add(r.seq)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    committer.close()
    assert not errors, errors[0]

    assert all(len(seqs) == 1 for seqs in acked.values()), "every caller of a key got the same seq"
    records = [r for r in log.read(limit=10_000) if r.type == "feedback"]
    stored = Counter(r.record.idempotency_key for r in records)
    assert set(stored) == set(acked) and set(stored.values()) == {1}
    seqs = [r.seq for r in records]
    assert all(a < b for a, b in itertools.pairwise(seqs))
    assert {r.seq for r in records} == {next(iter(s)) for s in acked.values()}
    assert committer.batches < 8 * 40, "concurrent calls shared transactions"


def test_feedback_committer_pushes_back_when_full(log):
    log.append_decisions([label_decision("d1")])
    gated = WrappedLog(log)
    entered, release = threading.Event(), threading.Event()

    def blocked_append(events, label_sets):
        entered.set()
        assert release.wait(10)
        return log.append_feedback(events, label_sets)

    gated.append_feedback = blocked_append
    committer = FeedbackCommitter(gated, capacity=3)
    try:
        first = committer.submit(
            [Feedback("accept", "a", event_id="d1"), Feedback("accept", "b", event_id="d1")], LABELS
        )
        assert entered.wait(5)
        with pytest.raises(ResourceExhausted, match="feedback commit queue full"):
            committer.submit([Feedback("accept", "c", event_id="d1"), Feedback("accept", "d", event_id="d1")], LABELS)
        release.set()
        assert [r.accepted for r in first.result(10)] == [True, True]
    finally:
        release.set()
        committer.close()


def test_feedback_on_a_decision_still_queued_is_accepted(log):
    """An annotator may answer before the decision's group commit: the committer waits for it."""
    slow = WrappedLog(log)

    def slow_append(decisions):
        # Write the decision only once the feedback on it is queued at the committer.
        wait_until(lambda: committer.pending > 0, 10, "the feedback to reach the committer")
        log.append_decisions(decisions)

    slow.append_decisions = slow_append
    writer = DecisionWriter(slow)
    committer = FeedbackCommitter(log, decisions=writer)
    try:
        writer.submit([label_decision("fresh")])
        [res] = committer.commit([Feedback("accept", key(), event_id="fresh")], LABELS, timeout=10)
        assert res.accepted, res.reason
    finally:
        committer.close()
        writer.close()


def test_cursor_consumer_misses_nothing_while_replicas_append(log, log_url):
    """Two writers on separate connections (as two replicas) append concurrently; a follower that only
    keeps a cursor must see every record exactly once, in increasing seq order."""
    log.append_decisions([label_decision("d")])
    stop = threading.Event()
    seen: list[int] = []
    n_writers, n_batches = 2, 60

    def follow() -> None:
        with open_feedback_log(log_url) as reader:
            for rec in reader.follow(after_seq=0, poll_s=0.005, max_poll_s=0.02, stop=stop):
                seen.append(rec.seq)

    def write(w: int) -> None:
        with open_feedback_log(log_url) as replica:
            for b in range(n_batches):
                events = [Feedback("accept", f"w{w}-{b}-{i}", event_id="d") for i in range(1 + b % 4)]
                assert all(r.accepted for r in replica.append_feedback(events, LABELS))

    follower = threading.Thread(target=follow)
    follower.start()
    writers = [threading.Thread(target=write, args=(w,)) for w in range(n_writers)]
    for th in writers:
        th.start()
    for th in writers:
        th.join(60)
    expected = [r.seq for r in log.read(limit=10_000)]
    try:
        wait_until(lambda: len(seen) >= len(expected), 10, "the follower to catch up")
    finally:
        stop.set()
    follower.join(5)
    assert seen == expected


# ---- durability ----------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys
    from loopserve.feedback_log import Feedback, open_feedback_log

    log = open_feedback_log(sys.argv[1])
    batch = 0
    while True:
        keys = [f"b{batch}-{i}" for i in range(1 + batch % 5)]
        events = [Feedback("rating", k, event_id="d", value=3, scale_min=1, scale_max=5) for k in keys]
        results = log.append_feedback(events, {})
        assert all(r.accepted and not r.duplicate for r in results)
        print(*keys, sep="\\n", flush=True)  # only after append_feedback returned: acknowledged
        batch += 1
    """
)


def test_acknowledged_events_survive_sigkill(log_url):
    with open_feedback_log(log_url) as log:
        log.append_decisions([generation("d")])
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, log_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    acked: list[str] = []
    try:
        assert child.stdout is not None
        while len(acked) < 300:
            line = child.stdout.readline()
            assert line, f"writer exited early: {child.stderr.read() if child.stderr else ''}"
            acked.append(line.strip())
        os.kill(child.pid, signal.SIGKILL)  # mid-stream: no chance to flush or close anything
        child.wait(10)
        acked.extend(line.strip() for line in child.stdout)  # acknowledged before the kill landed
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL

    with open_feedback_log(log_url) as reopened:
        stored = Counter(r.record.idempotency_key for r in reopened.read(limit=100_000) if r.type == "feedback")
    missing = [k for k in acked if stored[k] != 1]
    assert not missing, f"{len(missing)} acknowledged events lost or doubled, e.g. {missing[:3]}"


def test_open_feedback_log_chooses_backend_by_scheme(tmp_path):
    from loopserve.feedback_log.sqlite import SqliteFeedbackLog

    with open_feedback_log(f"sqlite://{tmp_path}/a.sqlite") as log:
        assert isinstance(log, SqliteFeedbackLog) and log.path == tmp_path / "a.sqlite"
    with pytest.raises(ValueError, match="file path"):
        open_feedback_log(":memory:")


@pytest.mark.postgres
def test_open_feedback_log_postgres_url(pg_url):
    from loopserve.feedback_log.postgres import PostgresFeedbackLog

    with open_feedback_log(create_database(pg_url, f"log_{uuid.uuid4().hex[:12]}")) as log:
        assert isinstance(log, PostgresFeedbackLog) and log.max_seq() == 0


@pytest.mark.postgres
def test_postgres_log_reconnects_after_the_server_drops_it(pg_url, caplog):
    """Connections dropped by the server (restart, failover, idle cut-off) are replaced on the next
    call, before anything is sent for it, so neither writes nor reads fail."""
    import psycopg

    url = create_schema(pg_url, f"log_{uuid.uuid4().hex[:12]}")
    with open_feedback_log(url) as log, caplog.at_level(logging.INFO, logger="loopserve"):
        log.append_decisions([label_decision("d1")])
        assert log.max_seq() == 1  # both connections are open now
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        [res] = log.append_feedback([Feedback("accept", key(), event_id="d1")], LABELS)
        assert res.accepted
        assert [r.type for r in log.read()] == ["decision", "feedback"]
    assert sum("connection lost" in r.getMessage() for r in caplog.records) == 2


def test_fast_feedback_body_is_the_json_the_general_encoder_writes() -> None:
    from loopserve.feedback_log.sql import feedback_json, to_json

    texts = ["plain", 'quote " and \\ backslash', "tab\tnew\nline\x01\x1f", "naïve café ☕ 😀", "\u2028\u2029", ""]
    events = [
        Feedback(kind="preference", idempotency_key=f"k{i}", prompt=t, chosen=t + "a", rejected=t + "b", annotator_id=t)
        for i, t in enumerate(texts)
    ]
    events += [
        Feedback(kind="rating", idempotency_key="r1", event_id="e", value=3.5, scale_min=1.0, scale_max=5.0),
        Feedback(kind="rating", idempotency_key="r2", event_id="e", value=3, scale_min=1, scale_max=5),  # ints
        Feedback(kind="rating", idempotency_key="r3", event_id="e", value=1e300, scale_min=-1e-300, scale_max=2.0),
        Feedback(kind="edit", idempotency_key="e1", event_id="e", text="x" * 5000, created=1.0),
    ]
    for fb in events:
        body = feedback_json(fb)
        assert body == to_json(fb)
        assert Feedback.from_dict(json.loads(body)) == fb
    with pytest.raises(ValueError):  # non-finite numbers are refused by both, never written as NaN
        feedback_json(Feedback(kind="rating", idempotency_key="n", event_id="e", value=float("nan")))


# ---- the commit on a second core (ProcessCommitter) -------------------------------------------


def _every_outcome() -> list[Feedback]:
    """One batch that meets every branch of an append: stored, normalised, refused by shape, by
    reference, by label, by kind, repeated in the batch, and repeated with another body."""
    return [
        Feedback("accept", "k1", event_id="d1"),  # stored with the served label filled in
        Feedback("correction", "k2", event_id="d2", label="great", annotator_id="ann"),
        Feedback("correction", "", event_id="d1", label="great"),  # no key: INVALID_ARGUMENT
        Feedback("correction", "k3", event_id="nope", label="great"),  # NOT_FOUND
        Feedback("correction", "k4", event_id="d1", label="meh"),  # not in the label set
        Feedback("preference", "k5", chosen_event_id="g1", rejected_event_id="g2"),
        Feedback("accept", "k1", event_id="d1"),  # the same event again: a duplicate
        Feedback("reject", "k2", event_id="d2"),  # the same key, another body: ALREADY_EXISTS
        Feedback("edit", "k6", event_id="d1", text="better"),  # FAILED_PRECONDITION
        Feedback("rating", "k7", event_id="g1", value=4, scale_min=1, scale_max=5),
    ]


def test_the_writer_process_answers_and_stores_as_the_log_itself_does(new_log_url):
    decisions = [label_decision("d1"), label_decision("d2", top="other"), generation("g1"), generation("g2")]
    events = _every_outcome()
    in_process, via_child = new_log_url(), new_log_url()
    with open_feedback_log(in_process) as log:
        log.append_decisions(decisions)
        expected = log.append_feedback(events, LABELS)
        expected_rows = [(r.seq, r.type, r.record) for r in log.read(0, 100)]
    with open_feedback_log(via_child) as log:
        log.append_decisions(decisions)
    committer = ProcessCommitter(via_child)
    try:
        pid = committer.child_pid
        assert pid is not None and pid != os.getpid()
        # Two callers: each gets its results in its own indices, whether they share a transaction or not.
        first, second = committer.submit(events[:4], LABELS), committer.submit(events[4:], LABELS)
        got = first.result(30) + [dataclasses.replace(r, index=r.index + 4) for r in second.result(30)]
    finally:
        committer.close()
    assert got == expected
    refused = {r.index: r.code for r in got if r.code}
    assert refused == {
        2: "INVALID_ARGUMENT",
        3: "NOT_FOUND",
        4: "INVALID_ARGUMENT",
        7: "ALREADY_EXISTS",
        8: "FAILED_PRECONDITION",
    }
    with open_feedback_log(via_child) as log:
        assert [(r.seq, r.type, r.record) for r in log.read(0, 100)] == expected_rows
    wait_until(lambda: not _alive(pid), 10, "the writer process to exit on close")


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_writer_that_dies_fails_its_batch_alone_and_the_next_batch_starts_another(tmp_path):
    import sqlite3

    url = str(tmp_path / "feedback.sqlite")
    with open_feedback_log(url) as log:
        log.append_decisions([label_decision("d1")])
    committer = ProcessCommitter(url)
    blocker = sqlite3.connect(url, isolation_level=None)
    restarts = REGISTRY.get_sample_value("loopserve_feedback_writer_restarts_total") or 0.0
    try:
        first_pid = committer.child_pid
        assert first_pid is not None
        blocker.execute("BEGIN IMMEDIATE")  # the writer waits for the lock: its batch stays unanswered
        stuck = committer.submit([Feedback("accept", "k1", event_id="d1")], LABELS)
        wait_until(lambda: committer.unanswered == 1, 10, "the batch to reach the writer process")
        os.kill(first_pid, signal.SIGKILL)
        with pytest.raises(Unavailable, match="retry with the same idempotency keys"):
            stuck.result(30)
        blocker.execute("ROLLBACK")
        # Nothing of the failed batch was stored, so its retry is new; the writer is started again for it.
        [retry] = committer.commit([Feedback("accept", "k1", event_id="d1")], LABELS, timeout=60)
        assert retry.accepted and not retry.duplicate
        assert committer.restarts == 1 and committer.child_pid not in (None, first_pid)
        assert REGISTRY.get_sample_value("loopserve_feedback_writer_restarts_total") == restarts + 1
    finally:
        blocker.close()
        committer.close()


def test_a_writer_that_cannot_start_again_fails_its_batch_and_the_committer_carries_on(tmp_path, monkeypatch):
    from loopserve.feedback_log import commit_process

    home = tmp_path / "logs"
    url = str(home / "feedback.sqlite")
    with open_feedback_log(url) as log:
        log.append_decisions([label_decision("d1")])
    committer = ProcessCommitter(url)
    try:
        first_pid = committer.child_pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        wait_until(lambda: committer.child_pid is None, 10, "the committer to see its writer gone")
        home.rename(tmp_path / "moved")
        home.write_text("")  # the log's directory is now a file: a new writer cannot open the log
        with pytest.raises(Unavailable, match="could not open the log"):
            committer.commit([Feedback("accept", "k1", event_id="d1")], LABELS, timeout=60)
        home.unlink()
        (tmp_path / "moved").rename(home)

        def no_process(*args: object, **kw: object) -> None:
            raise OSError(24, "Too many open files")  # what the service sees when out of descriptors

        with monkeypatch.context() as m:
            m.setattr(commit_process.subprocess, "Popen", no_process)
            with pytest.raises(Unavailable, match="could not store this batch"):
                committer.commit([Feedback("accept", "k1", event_id="d1")], LABELS, timeout=60)
        [retry] = committer.commit([Feedback("accept", "k1", event_id="d1")], LABELS, timeout=60)
        assert retry.accepted and not retry.duplicate
    finally:
        committer.close()


def test_closing_answers_every_batch_the_writer_took(tmp_path):
    """close() lets the writer finish and reads every answer before it lets go of the socket: no caller
    is told UNAVAILABLE about events that were committed."""
    url = str(tmp_path / "feedback.sqlite")
    with open_feedback_log(url) as log:
        log.append_decisions([label_decision("d1")])
    committer = ProcessCommitter(url, max_batch=10)
    futures = [
        committer.submit([Feedback("accept", f"k{i}-{j}", event_id="d1") for j in range(10)], LABELS) for i in range(40)
    ]
    committer.close()
    assert all(f.done() for f in futures)
    assert sum(r.accepted and not r.duplicate for f in futures for r in f.result(0)) == 400


_SERVICE_WITH_WRITER = textwrap.dedent(
    """
    import sys
    from loopserve.feedback_log.commit_process import ProcessCommitter

    committer = ProcessCommitter(sys.argv[1])
    print(committer.child_pid, flush=True)
    sys.stdin.read()  # serves until its stdin closes; the test kills it before then
    """
)


def test_the_writer_process_never_outlives_its_service(tmp_path):
    url = str(tmp_path / "feedback.sqlite")
    service = subprocess.Popen(
        [sys.executable, "-c", _SERVICE_WITH_WRITER, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert service.stdout is not None
        writer = int(service.stdout.readline())
        assert _alive(writer)
        service.kill()  # SIGKILL: no chance to close anything
        service.wait(30)
        wait_until(lambda: not _alive(writer), 30, "the writer process to exit after its service")
    finally:
        service.kill()


def test_a_log_the_writer_cannot_open_fails_at_start_with_the_reason(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(Unavailable, match=r"could not open the log: (FileExistsError|NotADirectoryError)"):
        ProcessCommitter(str(tmp_path / "a-file" / "feedback.sqlite"))
