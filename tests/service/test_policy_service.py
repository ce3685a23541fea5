"""The policy service over real gRPC on loopback, with tiny models: answers, bad input, auth,
back-pressure, deadlines, health and drain. After every bad input the server still serves."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc import aio
from grpc_health.v1 import health_pb2

from loopserve.client import AsyncClient
from loopserve.config import POLICY_SERVICE
from loopserve.device import dtype_name, pick_dtype
from loopserve.policy.v1 import policy_pb2
from tests.support.policy_harness import NO_RETRY, Running, policy_config, start_policy


@pytest.fixture
async def svc(tiny_data_dir: Path) -> AsyncIterator[Running]:
    running = await start_policy(policy_config(tiny_data_dir))
    yield running
    await running.app.stop(1)


async def _code(coro: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(aio.AioRpcError) as e:
        await coro  # type: ignore[misc]
    return e.value.code(), e.value.details() or ""


async def test_annotate_generate_stream_and_info(svc: Running) -> None:
    async with svc.client() as c:
        r = await c.annotate([("x1", "lovely tea"), ("x2", "bad")], top_k=1)
        assert r.model_version == "v0"
        assert [a.item_id for a in r.annotations] == ["x1", "x2"]
        assert all(len(a.labels) == 1 and a.labels[0].label in {"great", "other"} for a in r.annotations)
        assert all(len(a.event_id) == 32 for a in r.annotations)

        g = await c.generate("hi", n=2, max_new_tokens=6, seed=1, temperature=1.0)
        assert g.model_version == "v0" and len(g.completions) == 2
        assert all(0 < comp.num_tokens <= 6 or comp.finish_reason == "stop" for comp in g.completions)

        msgs = [m async for m in c.generate_stream("hi", max_new_tokens=6, seed=2)]
        assert msgs[-1].done and msgs[-1].event_id and all(m.model_version == "v0" for m in msgs)

        info = await c.model_info()
        assert info.task == "sentiment" and [lb.name for lb in info.labels] == ["great", "other"]
        assert info.annotator_version == "v0" and info.generator_version == "v0"
        assert info.dtype == dtype_name(pick_dtype("auto", torch.device("cpu")))  # --dtype auto, resolved


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_the_dtype_flag_is_the_precision_both_models_run_in(tiny_data_dir: Path, dtype: str) -> None:
    running = await start_policy(policy_config(tiny_data_dir, dtype=dtype, encoder_token_budget=96))
    try:
        runtime = running.app.runtime
        assert runtime.opts.token_budget == 96  # --encoder-token-budget reaches the serving runtime too
        annotator = runtime.annotator.current.model.model
        assert runtime.generator is not None
        weights = [*annotator.encoder.parameters(), *runtime.generator.current.model.model.parameters()]
        assert {p.dtype for p in weights} == {getattr(torch, dtype)}
        async with running.client() as c:
            assert (await c.model_info()).dtype == dtype
            r = await c.annotate([("x1", "lovely tea")])
            assert all(math.isfinite(lb.score) for lb in r.annotations[0].labels)
    finally:
        await running.app.stop(1)


BAD_ANNOTATE = [
    ("empty batch", policy_pb2.AnnotateRequest(items=[]), "items is empty"),
    ("empty text", policy_pb2.AnnotateRequest(items=[policy_pb2.Item(id="a", text="  ")]), "empty"),
    (
        "oversize text",
        policy_pb2.AnnotateRequest(items=[policy_pb2.Item(id="a", text="x" * 20_001)]),
        "limit is 20000",
    ),
    (
        "too many items",
        policy_pb2.AnnotateRequest(items=[policy_pb2.Item(id=str(i), text="t") for i in range(257)]),
        "limit is 256",
    ),
    (
        "unknown task",
        policy_pb2.AnnotateRequest(task="ner", items=[policy_pb2.Item(id="a", text="t")]),
        "unknown task",
    ),
    (
        "negative top_k",
        policy_pb2.AnnotateRequest(top_k=-1, items=[policy_pb2.Item(id="a", text="t")]),
        "top_k",
    ),
]

BAD_GENERATE = [
    ("empty prompt", policy_pb2.GenerateRequest(prompt=""), "prompt is empty"),
    ("max tokens over cap", policy_pb2.GenerateRequest(prompt="p", max_new_tokens=33), "max_new_tokens"),
    ("negative temperature", policy_pb2.GenerateRequest(prompt="p", temperature=-0.5), "temperature"),
    ("NaN temperature", policy_pb2.GenerateRequest(prompt="p", temperature=math.nan), "finite"),
    ("top_p zero", policy_pb2.GenerateRequest(prompt="p", top_p=0.0), "top_p"),
    ("top_p over one", policy_pb2.GenerateRequest(prompt="p", top_p=1.5), "top_p"),
    ("NaN top_p", policy_pb2.GenerateRequest(prompt="p", top_p=math.nan), "finite"),
    ("too many completions", policy_pb2.GenerateRequest(prompt="p", n=17), "n must be"),
    ("empty stop string", policy_pb2.GenerateRequest(prompt="p", stop=[""]), "stop string"),
]


@pytest.mark.parametrize(("name", "request_pb", "needle"), BAD_ANNOTATE, ids=[b[0] for b in BAD_ANNOTATE])
async def test_bad_annotate_is_invalid_argument(svc: Running, name: str, request_pb: object, needle: str) -> None:
    async with svc.client() as c:
        code, details = await _code(c.policy.Annotate(request_pb, metadata=c.metadata, timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, name
        assert needle in details
        assert (await c.annotate(["still fine"])).annotations
    assert await svc.health() == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(("name", "request_pb", "needle"), BAD_GENERATE, ids=[b[0] for b in BAD_GENERATE])
async def test_bad_generate_is_invalid_argument(svc: Running, name: str, request_pb: object, needle: str) -> None:
    async with svc.client() as c:
        code, details = await _code(c.policy.Generate(request_pb, metadata=c.metadata, timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, name
        assert needle in details
        stream_code, _ = await _code(_drain(c.policy.GenerateStream(request_pb, metadata=c.metadata, timeout=10)))
        assert stream_code == grpc.StatusCode.INVALID_ARGUMENT
        assert (await c.generate("still fine", max_new_tokens=2)).completions


async def _drain(call: object) -> None:
    async for _ in call:  # type: ignore[attr-defined]
        pass


async def test_stream_needs_one_completion(svc: Running) -> None:
    async with svc.client() as c:
        code, details = await _code(
            _drain(c.policy.GenerateStream(policy_pb2.GenerateRequest(prompt="p", n=2), metadata=c.metadata))
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "n must be 0 or 1" in details


async def test_auth_missing_wrong_and_insufficient(svc: Running) -> None:
    async with AsyncClient(svc.target, None, retry=NO_RETRY) as anon:
        code, details = await _code(anon.annotate(["x"]))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer" in details
    async with AsyncClient(svc.target, "not-a-real-token-at-all", retry=NO_RETRY) as wrong:
        assert (await _code(wrong.annotate(["x"])))[0] == grpc.StatusCode.UNAUTHENTICATED
    async with svc.client("client") as c:
        from loopserve.admin.v1 import admin_pb2

        code, details = await _code(
            c.admin.ListVersions(admin_pb2.ListVersionsRequest(model="annotator"), metadata=c.metadata)
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED and "admin" in details
    async with svc.client("admin") as a:  # admin may predict too
        assert (await a.annotate(["x"])).annotations


async def test_health_and_reflection_are_open(svc: Running) -> None:
    assert await svc.health("") == health_pb2.HealthCheckResponse.SERVING
    assert await svc.health(POLICY_SERVICE) == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with aio.insecure_channel(svc.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def one() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for resp in stub.ServerReflectionInfo(one()):
            names = {s.name for s in resp.list_services_response.service}
            assert {POLICY_SERVICE, "loopserve.admin.v1.ModelAdmin"} <= names


async def test_queue_full_is_resource_exhausted_and_recovers(tiny_data_dir: Path) -> None:
    running = await start_policy(policy_config(tiny_data_dir, max_queue=8, max_batch_size=8, max_wait_ms=200.0))
    try:
        async with running.client() as c:
            texts = ["some words " * 10] * 8
            results = await asyncio.gather(*(c.annotate(texts) for _ in range(12)), return_exceptions=True)
            codes = [r.code() for r in results if isinstance(r, aio.AioRpcError)]
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
            assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert any(not isinstance(r, BaseException) for r in results)
            assert (await c.annotate(["after the burst"])).annotations
    finally:
        await running.app.stop(1)


async def test_deadline_shorter_than_batch_wait(tiny_data_dir: Path) -> None:
    running = await start_policy(policy_config(tiny_data_dir, max_wait_ms=1500.0))
    try:
        async with running.client() as c:
            code, _ = await _code(c.annotate(["x"], timeout_s=0.2))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.sleep(0.05)
            assert running.app.frontend.annotate_batcher.queued_items == 0  # it left the queue
            r = await c.annotate(["y"], timeout_s=10)  # the worker is not stuck
            assert r.annotations
    finally:
        await running.app.stop(1)


async def test_drain_finishes_in_flight_and_refuses_new(tiny_data_dir: Path) -> None:
    running = await start_policy(policy_config(tiny_data_dir, max_wait_ms=600.0))
    async with running.client() as c:
        in_flight = asyncio.create_task(c.annotate(["in flight"], timeout_s=10))
        await asyncio.sleep(0.1)
        stopping = asyncio.create_task(running.app.stop(5))
        await asyncio.sleep(0.1)
        r = await in_flight
        assert r.annotations and r.model_version == "v0"
        await stopping
        code, _ = await _code(c.annotate(["too late"], timeout_s=2))
        assert code == grpc.StatusCode.UNAVAILABLE


async def test_health_watch_streams_through_the_interceptors(svc: Running) -> None:
    # Watch is a streaming handler written with context.write (not a generator): probes and
    # `wait_until_serving` rely on it passing through the status and auth interceptors.
    from loopserve.client import wait_until_serving

    await asyncio.to_thread(wait_until_serving, svc.target, 10)
