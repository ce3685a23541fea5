"""The Label Studio ML backend adapter over HTTP on loopback, in front of a real policy service (tiny
models) and its real feedback log: the protocol, auth, limits, metrics and the trainer round request.
The real Label Studio server and browser are in test_labelstudio_e2e.py (slow)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from loopserve.annotation.round_requests import pending_rounds
from loopserve.feedback_log import open_feedback_log
from loopserve.feedback_log.records import Decision, Feedback
from loopserve.labelstudio.config import MLBackendConfig
from loopserve.labelstudio.labeling_config import text_classification_config
from tests.support.adapter_harness import RunningAdapter, serve_adapter
from tests.support.policy_harness import Running, policy_config, start_policy

CONFIG = text_classification_config(["great", "other"])
PROJECT = "7.1764500000"


@pytest.fixture
async def stack(tiny_data_dir: Path) -> AsyncIterator[tuple[Running, RunningAdapter]]:
    policy = await start_policy(policy_config(tiny_data_dir))
    cfg = MLBackendConfig(
        data_dir=tiny_data_dir, policy_target=policy.target, refresh_interval_s=0, max_body_bytes=200_000
    )
    async with serve_adapter(cfg) as adapter:
        yield policy, adapter
    await policy.app.stop(1)


def basic(token: str, user: str = "labelstudio") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}


def tasks(n: int, start: int = 1) -> list[dict[str, object]]:
    return [
        {"id": i, "data": {"text": f"review number {i}: tasty coffee, fast delivery"}} for i in range(start, start + n)
    ]


def log_records(data_dir: Path) -> tuple[dict[str, Decision], list[Feedback]]:
    with open_feedback_log(str(data_dir / "feedback.sqlite3")) as log:
        recs = log.read(0, 100_000)
    decisions = {r.record.event_id: r.record for r in recs if isinstance(r.record, Decision)}
    return decisions, [r.record for r in recs if isinstance(r.record, Feedback)]


def annotation_payload(prediction: dict, label: str, ann_id: int, task_id: int, updated_at: str) -> dict:
    """What Label Studio posts when an annotator submits a task that started from `prediction`."""
    region = dict(prediction["result"][0], value={"choices": [label]})
    region.pop("score", None)
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {
            "id": ann_id,
            "task": task_id,
            "project": 7,
            "result": [region],
            "updated_at": updated_at,
            "completed_by": 1,
            "was_cancelled": False,
        },
        "task": {"id": task_id, "project": 7, "data": {}},
        "project": {"id": 7},
    }


async def test_predict_then_accept_and_correct_join_to_event_ids(stack: tuple[Running, RunningAdapter]) -> None:
    policy, adapter = stack
    auth = basic(policy.tokens["annotator"])
    async with httpx.AsyncClient(base_url=adapter.url, headers=auth, timeout=30) as http:
        health = (await http.get("/health")).json()
        version = health["model_version"]
        assert health["status"] == "UP" and version == policy.app.runtime.annotator.current.version
        r = await http.post("/setup", json={"project": PROJECT, "schema": CONFIG})
        assert r.status_code == 200 and r.json() == {"model_version": version}

        batch = [*tasks(5), {"id": 99, "data": {"text": ""}}]
        r = await http.post("/predict", json={"tasks": batch, "project": PROJECT, "label_config": CONFIG})
        assert r.status_code == 200
        body = r.json()
        assert body["model_version"] == version and len(body["results"]) == 6
        preds = body["results"][:5]
        for p in preds:
            region = p["result"][0]
            assert p["model_version"] == version and 0.0 < p["score"] <= 1.0
            assert region["from_name"] == "label" and region["to_name"] == "text" and region["type"] == "choices"
            assert region["value"]["choices"][0] in ("great", "other")
        assert body["results"][5]["result"] == []  # no text: an empty prediction, the others unharmed

        served = preds[0]["result"][0]["value"]["choices"][0]
        other = "other" if served == "great" else "great"
        accept = annotation_payload(preds[0], served, ann_id=501, task_id=1, updated_at="2026-11-30T10:00:00Z")
        correct = annotation_payload(
            preds[1],
            other if preds[1]["result"][0]["value"]["choices"][0] == served else served,
            ann_id=502,
            task_id=2,
            updated_at="2026-11-30T10:00:01Z",
        )
        r1 = await http.post("/webhook", json=accept)
        r2 = await http.post("/webhook", json=correct)
        assert r1.status_code == 201 and r1.json()["kind"] == "accept"
        assert r2.status_code == 201 and r2.json()["kind"] == "correction"
        again = await http.post("/webhook", json=accept)  # Label Studio re-sends: acknowledged, stored once
        assert again.status_code == 201 and again.json()["duplicate"] is True
        update = json.loads(json.dumps(accept))
        update["action"], update["annotation"]["updated_at"] = "ANNOTATION_UPDATED", "2026-11-30T10:05:00Z"
        update["annotation"]["result"][0]["value"]["choices"] = [other]
        r3 = await http.post("/webhook", json=update)  # the annotator changed their mind: new feedback
        assert r3.status_code == 201 and r3.json()["kind"] == "correction" and r3.json()["duplicate"] is False

    decisions, feedback = log_records(Path(policy.app.cfg.data_dir))
    e1, e2 = preds[0]["result"][0]["id"], preds[1]["result"][0]["id"]
    assert {e1, e2} <= set(decisions)
    assert decisions[e1].model_version == version
    assert [(f.kind, f.event_id) for f in feedback] == [("accept", e1), ("correction", e2), ("correction", e1)]
    assert feedback[0].label == served and feedback[2].label == other
    assert all(f.annotator_id == "labelstudio:1" for f in feedback)


async def test_auth_comes_before_the_body(stack: tuple[Running, RunningAdapter]) -> None:
    policy, adapter = stack
    async with httpx.AsyncClient(base_url=adapter.url, timeout=30) as http:
        r = await http.post("/predict", content=b"not json at all")
        assert r.status_code == 401 and "basic auth" in r.json()["error"]
        assert r.headers["www-authenticate"].startswith("Basic")
        r = await http.post("/predict", content=b"{}", headers=basic("x" * 40))
        assert r.status_code == 401 and r.json()["error"] == "unknown token"
        r = await http.post("/predict", content=b"{}", headers=basic(policy.tokens["client"]))
        assert r.status_code == 403 and "annotator role" in r.json()["error"]
        bearer = {"Authorization": f"Bearer {policy.tokens['annotator']}"}
        r = await http.post("/setup", json={"project": PROJECT, "schema": CONFIG}, headers=bearer)
        assert r.status_code == 200
        r = await http.post("/predict", content=b"not json", headers=bearer)
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


async def test_bad_requests_get_clear_statuses_and_are_counted(stack: tuple[Running, RunningAdapter]) -> None:
    policy, adapter = stack
    async with httpx.AsyncClient(base_url=adapter.url, headers=basic(policy.tokens["admin"]), timeout=30) as http:
        spans = '<View><Text name="t" value="$text"/><Labels name="l" toName="t"><Label value="A"/></Labels></View>'
        r = await http.post("/setup", json={"project": PROJECT, "schema": spans})
        assert r.status_code == 400 and "<Labels>" in r.json()["error"]
        wrong = text_classification_config(["positive", "negative"])
        r = await http.post("/setup", json={"project": PROJECT, "schema": wrong})
        assert r.status_code == 400 and "differ from the labels" in r.json()["error"]
        r = await http.post("/predict", json={"tasks": tasks(2), "project": PROJECT, "label_config": "<View"})
        assert r.status_code == 400 and "well-formed" in r.json()["error"]
        r = await http.post("/predict", json={"tasks": "nope", "project": PROJECT, "label_config": CONFIG})
        assert r.status_code == 400
        huge = {"tasks": [{"id": 1, "data": {"text": "x" * 300_000}}], "project": PROJECT, "label_config": CONFIG}
        r = await http.post("/predict", json=huge)
        assert r.status_code == 413
        r = await http.post("/predict", content=b'{"tasks": [{"id": 1, "data": {"text": "\\ud800"}}]}')
        assert r.status_code == 400 and "UTF-8" in r.json()["error"]
        unknown = {
            "action": "ANNOTATION_CREATED",
            "project": {"id": 7},
            "task": {"id": 3},
            "annotation": {
                "id": 9,
                "task": 3,
                "project": 7,
                "updated_at": "t",
                "result": [
                    {
                        "id": "f" * 32,
                        "from_name": "label",
                        "to_name": "text",
                        "type": "choices",
                        "value": {"choices": ["great"]},
                    }
                ],
            },
        }
        await http.post("/setup", json={"project": PROJECT, "schema": CONFIG})
        r = await http.post("/webhook", json=unknown)
        assert r.status_code == 409 and "no loopserve prediction" in r.json()["error"]
        r = await http.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 7}})
        assert r.status_code == 201 and r.json()["status"] == "ignored"
        r = await http.post("/predict", json={"tasks": tasks(3), "project": PROJECT, "label_config": CONFIG})
        assert r.status_code == 200  # after all that, the adapter serves as before
        text = (await http.get("/metrics")).text
    assert 'loopserve_requests_total{code="OK",method="predict",service="labelstudio.MLBackend"}' in text
    assert 'loopserve_requests_total{code="INVALID_ARGUMENT",method="setup",service="labelstudio.MLBackend"}' in text


async def test_start_training_asks_the_trainer_for_a_round(stack: tuple[Running, RunningAdapter]) -> None:
    policy, adapter = stack
    trainer_dir = Path(policy.app.cfg.data_dir) / "trainer"
    assert pending_rounds(trainer_dir) == set()
    async with httpx.AsyncClient(base_url=adapter.url, timeout=30) as http:
        r = await http.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
        assert r.status_code == 401  # the trainer is asked by annotators only
        r = await http.post(
            "/webhook",
            json={"action": "START_TRAINING", "project": {"id": 7}},
            headers=basic(policy.tokens["annotator"]),
        )
        assert r.status_code == 201 and r.json()["model"] == "annotator"
    assert pending_rounds(trainer_dir) == {"annotator"}
    assert (trainer_dir / "round_requests" / "annotator.json").stat().st_mode & 0o777 == 0o600


def test_a_requested_round_runs_before_it_is_due(tiny_data_dir: Path) -> None:
    """What "Start training" in Label Studio relies on: the trainer runs a requested round at its next
    poll even when `round_min_events` is far away, and consumes the request."""
    import random

    from loopserve.annotation.round_requests import request_round
    from tests.e2e.test_trainer_loop import small_args, write_label_stream
    from trainer.loop import read_rounds, run_trainer

    with open_feedback_log(str(tiny_data_dir / "feedback.sqlite3")) as log:
        write_label_stream(log, random.Random(3), 200)
        last = log.max_seq()
    args = small_args(tiny_data_dir, models="annotator")
    args.round_min_events, args.annotator.epochs = 100_000, 1
    run_trainer(args)
    assert read_rounds(args) == []  # not due
    request_round(args.trainer_dir, "annotator", "test")
    run_trainer(args)
    [row] = read_rounds(args)
    assert row["model"] == "annotator" and row["result"] in ("published", "gated"), row
    assert pending_rounds(args.trainer_dir) == set()
    # The row says how far into the log the round read (what `loopserve demo` waits on): all of it here.
    assert row["cursor"] == last > 0


def test_rounds_on_request_runs_full_rounds_only_when_asked(tiny_data_dir: Path, tmp_path: Path) -> None:
    """`--rounds-on-request`, as `loopserve demo` hands it to its trainer: with every other trigger due at
    once, no full round runs until one is asked for, and the asked-for one runs."""
    import random

    from loopserve.annotation.round_requests import request_round
    from loopserve.cli.demo.annotation import AnnotationDemoOptions, _trainer_flags
    from tests.e2e.test_trainer_loop import small_args, write_label_stream
    from trainer.__main__ import read_args
    from trainer.loop import read_rounds, run_trainer

    demo = read_args(_trainer_flags(AnnotationDemoOptions(), tmp_path), environ={})
    assert demo.rounds_on_request and not read_args([], environ={}).rounds_on_request
    with open_feedback_log(str(tiny_data_dir / "feedback.sqlite3")) as log:
        write_label_stream(log, random.Random(3), 200)
    args = small_args(tiny_data_dir, models="annotator")
    args.rounds_on_request = demo.rounds_on_request
    args.round_min_events, args.round_interval_s, args.annotator.epochs = 1, 0.0, 1
    run_trainer(args)
    assert read_rounds(args) == []  # due three ways over, but not asked
    request_round(args.trainer_dir, "annotator", "test")
    run_trainer(args)
    [row] = read_rounds(args)
    assert row["model"] == "annotator" and row["result"] in ("published", "gated"), row


async def test_ml_backend_command_flags_reach_the_adapter(tiny_data_dir: Path, tmp_path: Path) -> None:
    """`loopserve ml-backend` as its own process: each flag it shows takes effect there."""
    import asyncio
    import shutil
    import subprocess
    import sys

    from loopserve.ports import free_port

    policy = await start_policy(policy_config(tiny_data_dir))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(policy.app.cfg.token_path, elsewhere / "tokens.json")
    port = free_port()
    argv = [sys.executable, "-m", "loopserve", "ml-backend", "--data-dir", str(tmp_path / "empty")]
    argv += ["--port", str(port), "--policy-target", policy.target, "--token-file", str(elsewhere / "tokens.json")]
    argv += ["--trainer-dir", str(tmp_path / "trainer"), "--max-tasks-per-request", "3", "--refresh-interval-s", "0"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            for _ in range(600):
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
                await asyncio.sleep(0.05)
            auth = basic(policy.tokens["annotator"])
            r = await http.post(
                "/predict", json={"tasks": tasks(4), "project": PROJECT, "label_config": CONFIG}, headers=auth
            )
            assert r.status_code == 413 and "limit is 3" in r.json()["error"]
            r = await http.post(
                "/predict", json={"tasks": tasks(3), "project": PROJECT, "label_config": CONFIG}, headers=auth
            )
            assert r.status_code == 200 and len(r.json()["results"]) == 3
            r = await http.post("/train", json={"project": PROJECT}, headers=auth)
            assert r.status_code == 201
        assert pending_rounds(tmp_path / "trainer") == {"annotator"}
    finally:
        proc.terminate()
        proc.wait(30)
        await policy.app.stop(1)
