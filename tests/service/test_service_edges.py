"""Edges of the policy service over real gRPC on loopback, with tiny models (service tier).

- GenerateStream honours the client's deadline: the client gets DEADLINE_EXCEEDED, the decode row of
  the call that went away stops (it ends "cancelled", long before max_new_tokens), nothing stays
  queued, and the next request is answered.
- The Prometheus /metrics endpoint exposes the serving metrics DESIGN.md names, with request, latency,
  batch, swap, version and feedback figures that move when calls are made.
"""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from loopserve import metrics
from loopserve.client import AsyncClient, generate_request
from loopserve.config import POLICY_SERVICE
from loopserve.feedback.v1 import feedback_pb2 as fb
from loopserve.serving.continuous_batcher import ContinuousBatcher
from policy_service.app import PolicyApp
from policy_service.types import Completion
from tests.support.policy_harness import Running, policy_config, start_policy
from tests.support.waiting import wait_until

# A stream far longer than its deadline: the tiny generator needs well over a millisecond a token on
# CPU (a forward, a sample and a detokenisation of the whole text so far), so 1,500 tokens take
# seconds, while the first token comes within milliseconds.
LONG_TOKENS = 1500
STREAM_DEADLINE_S = 1.0


@pytest.fixture
async def svc(tiny_data_dir: Path) -> AsyncIterator[Running]:
    running = await start_policy(policy_config(tiny_data_dir, max_new_tokens_cap=LONG_TOKENS))
    yield running
    await running.app.stop(1)


# ---- GenerateStream and the client's deadline --------------------------------------------------------


def _spy_on_generate_batches(app: PolicyApp) -> list[Completion]:
    """Every completion the decode loop produces, appended as each request's rows end (on the decode
    thread): what the decode loop really did, whatever the client saw."""
    batcher = app.frontend.generate_batcher
    assert isinstance(batcher, ContinuousBatcher)
    real = batcher.finish
    finished: list[Completion] = []

    def spy(key: Any, job: Any, rows: Any) -> Any:
        comps = real(key, job, rows)
        finished.extend(comps)
        return comps

    batcher.finish = spy
    return finished


async def _stream_past_deadline(c: AsyncClient, seed: int) -> None:
    """A long stream with a short deadline: tokens arrive, then DEADLINE_EXCEEDED, never the end."""
    request = generate_request("Tell me a very long story.", max_new_tokens=LONG_TOKENS, seed=seed)
    call = c.policy.GenerateStream(request, metadata=c.metadata, timeout=STREAM_DEADLINE_S)
    received = []
    with pytest.raises(aio.AioRpcError) as e:
        async for msg in call:
            received.append(msg)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
    assert received, "no token before the deadline: is an earlier stream that went away still decoding?"
    assert not any(m.done for m in received), "the stream finished before its deadline: make LONG_TOKENS longer"


async def _all_stopped(finished: list[Completion], count: int) -> None:
    await asyncio.to_thread(
        wait_until, lambda: len(finished) >= count, 30, f"{count} decode rows to end after their callers left"
    )


async def test_generate_stream_honours_the_client_deadline_and_frees_its_slot(tiny_data_dir: Path) -> None:
    # A batch window wide enough that streams sent together are decoded in one batch.
    svc = await start_policy(policy_config(tiny_data_dir, max_new_tokens_cap=LONG_TOKENS, max_wait_ms=300.0))
    try:
        await _check_stream_deadlines(svc)
    finally:
        await svc.app.stop(1)


async def _check_stream_deadlines(svc: Running) -> None:
    finished = _spy_on_generate_batches(svc.app)
    batcher = svc.app.frontend.generate_batcher
    async with svc.client() as c:
        # One after another: each stream is decoding (tokens arrived) when its deadline passes.
        for seed in range(3):
            await _stream_past_deadline(c, seed)
        await _all_stopped(finished, 3)
        # Several at once, sharing one batch: a batch whose every row went away ends too.
        await asyncio.gather(*(_stream_past_deadline(c, seed) for seed in range(10, 13)))
        await _all_stopped(finished, 6)

        # The decode loop saw each caller leave and stopped its row, long before max_new_tokens.
        assert [comp.finish_reason for comp in finished] == ["cancelled"] * 6
        assert all(comp.num_tokens < LONG_TOKENS for comp in finished)
        assert batcher.queued_items == 0  # nothing left holding queue room

        # The service is healthy and answers the next requests, streamed and not.
        assert await svc.health() == health_pb2.HealthCheckResponse.SERVING
        g = await c.generate("hi", n=2, max_new_tokens=4, seed=1, timeout_s=30)
        assert g.model_version == "v0" and len(g.completions) == 2
        msgs = [m async for m in c.generate_stream("hi", max_new_tokens=4, seed=2, timeout_s=30)]
        assert msgs[-1].done and msgs[-1].event_id
        assert (await c.annotate(["still fine"])).annotations
    after = finished[6:]  # the two requests after the cancelled ones ran to their end
    assert len(after) == 3 and all(comp.finish_reason in {"length", "stop"} for comp in after)


# ---- /metrics ------------------------------------------------------------------------------------------

# DESIGN.md "Metrics": the names a policy service process serves (the trainer's lag, loss and publish
# metrics are the trainer process's), with the Prometheus type each must have.
DESIGN_SERVING_METRICS = {
    "loopserve_requests": "counter",  # loopserve_requests_total{service,method,code}
    "loopserve_request_seconds": "histogram",
    "loopserve_batch_size": "histogram",
    "loopserve_queue_depth": "gauge",
    "loopserve_model_version": "gauge",
    "loopserve_swaps": "counter",  # loopserve_swaps_total{model,result}
    "loopserve_swap_seconds": "histogram",
    "loopserve_feedback_events": "counter",  # loopserve_feedback_events_total{kind}
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(url: str) -> tuple[dict[str, str], Samples]:
    """(family name -> type, (sample name, labels) -> value) from one GET of /metrics."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    families: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return families, samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def metrics_url() -> Iterator[str]:
    """/metrics as the service process serves it (`serve_metrics`), on an ephemeral loopback port."""
    httpd = metrics.serve_metrics(0, host="127.0.0.1")
    yield f"http://127.0.0.1:{httpd.server_port}/metrics"
    httpd.shutdown()
    httpd.server_close()


async def test_metrics_endpoint_exposes_the_design_metrics_with_live_counts(svc: Running, metrics_url: str) -> None:
    # The registry is the process's: other tests in this session count too, so compare before/after.
    _, before = await asyncio.to_thread(_scrape, metrics_url)
    async with svc.client() as c, svc.client("annotator") as a:
        served: list[Any] = []
        for text in ("lovely tea", "stale coffee", "fine"):
            served.extend((await c.annotate([text])).annotations)
        await c.generate("hi", max_new_tokens=3, seed=1)
        await c.generate("hello", n=2, max_new_tokens=3, seed=2)
        with pytest.raises(aio.AioRpcError) as bad:
            await c.generate("", max_new_tokens=3)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        accepted = await a.submit(
            [
                fb.FeedbackEvent(
                    idempotency_key=uuid.uuid4().hex,
                    annotator_id="ann-1",
                    correction=fb.LabelCorrection(event_id=served[0].event_id, label="great"),
                )
            ]
        )
        assert accepted.accepted == 1
    families, after = await asyncio.to_thread(_scrape, metrics_url)

    for name, kind in DESIGN_SERVING_METRICS.items():
        assert families.get(name) == kind, f"{name} ({kind}) missing from /metrics: {sorted(families)}"

    def grew(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    policy = {"service": POLICY_SERVICE}
    assert grew("loopserve_requests_total", **policy, method="Annotate", code="OK") >= 3
    assert grew("loopserve_requests_total", **policy, method="Generate", code="OK") >= 2
    assert grew("loopserve_requests_total", **policy, method="Generate", code="INVALID_ARGUMENT") >= 1
    assert _value(after, "loopserve_requests_total", **policy, method="Annotate", code="OK") > 0
    assert grew("loopserve_request_seconds_count", **policy, method="Annotate") >= 3
    assert grew("loopserve_request_seconds_count", **policy, method="Generate") >= 3
    assert _value(after, "loopserve_request_seconds_sum", **policy, method="Annotate") > 0
    assert grew("loopserve_batch_size_count", model="annotate") >= 1
    assert grew("loopserve_batch_size_count", model="generate") >= 1
    assert grew("loopserve_batch_size_sum", model="annotate") >= 3  # every annotated item ran in a batch
    assert ("loopserve_queue_depth", frozenset({("queue", "annotate")})) in after
    assert grew("loopserve_feedback_events_total", kind="correction") >= 1
    # Loading v0 at start is a swap, and the served versions are published as numbers.
    for model in ("annotator", "generator"):
        assert _value(after, "loopserve_swaps_total", model=model, result="ok") >= 1
        assert _value(after, "loopserve_swap_seconds_count", model=model) >= 1
        assert ("loopserve_model_version", frozenset({("model", model)})) in after
        assert _value(after, "loopserve_model_version", model=model) == 0  # v0
