"""ModelAdmin over real gRPC with tiny models: who may call it, unknown versions, LoadVersion, Pin
against the watch, Unpin, Rollback, ListVersions, and a refused push that leaves the old version."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from loopserve.admin.v1 import admin_pb2 as pb
from loopserve.client import AsyncClient
from tests.service.test_hotswap import Service, _wrong_shape, head_bias, service_factory, variant

__all__ = ["service_factory"]  # the fixture, shared with tests/service/test_hotswap.py


async def admin(c: AsyncClient, method: str, **fields: Any) -> Any:
    request = getattr(pb, f"{method}Request")(**fields)
    return await getattr(c.admin, method)(request, metadata=c.metadata, timeout=60)


async def code_of(coro: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(aio.AioRpcError) as e:
        await coro
    return e.value.code(), e.value.details() or ""


async def serving(svc: Service) -> str:
    async with svc.client() as c:
        return (await c.annotate(["a fine cup of tea"])).model_version


async def settle(svc: Service, polls: int = 5) -> None:
    """Let the watch (0.1 s) poll a few times."""
    await asyncio.sleep(0.1 * polls)


async def until_serving(svc: Service, version: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while await serving(svc) != version:
        assert time.monotonic() < deadline, f"{version} never served"
        await asyncio.sleep(0.05)


@pytest.fixture
async def svc(service_factory: Callable[..., Awaitable[Service]], tmp_path: Path) -> Service:
    s = await service_factory()
    v0 = s.store.path("annotator", "v0")
    for i in (1, 2):  # v1 and v2 in the store, LATEST still v0
        await s.publish("annotator", variant(v0, tmp_path / f"a{i}", head_bias(float(i))), set_latest=False)
    return s


async def test_only_the_admin_role_may_call_model_admin(svc: Service) -> None:
    for role in ("client", "annotator"):
        async with svc.client(role) as c:
            code, details = await code_of(admin(c, "LoadVersion", model="annotator", version="v1"))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "admin role" in details
            code, _ = await code_of(admin(c, "ListVersions", model="annotator"))
            assert code == grpc.StatusCode.PERMISSION_DENIED
    async with AsyncClient(svc.target, None) as anonymous:
        code, _ = await code_of(admin(anonymous, "Rollback", model="annotator"))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    assert await serving(svc) == "v0"


async def test_unknown_versions_and_models_are_not_found(svc: Service) -> None:
    async with svc.client("admin") as c:
        for version in ("v9", "latest"):
            code, details = await code_of(admin(c, "LoadVersion", model="annotator", version=version))
            assert code == grpc.StatusCode.NOT_FOUND and version in details
        code, details = await code_of(admin(c, "LoadVersion", model="generator", version="v0"))
        assert code == grpc.StatusCode.NOT_FOUND and "serves annotator" in details
        code, _ = await code_of(admin(c, "Pin", model="annotator", version="v9"))
        assert code == grpc.StatusCode.NOT_FOUND
        code, _ = await code_of(admin(c, "LoadVersion", model="annotator", version=""))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert await serving(svc) == "v0"


async def test_load_version_serves_it_until_the_next_publish(svc: Service, tmp_path: Path) -> None:
    async with svc.client("admin") as c:
        status = await admin(c, "LoadVersion", model="annotator", version="v2")
        assert (status.model_version, status.previous_version, status.pinned_version) == ("v2", "v0", "")
        assert await serving(svc) == "v2"
        await settle(svc)
        assert await serving(svc) == "v2"  # the watch does not undo a push while LATEST stands still
        v3 = await svc.publish("annotator", variant(svc.store.path("annotator", "v0"), tmp_path / "a3", head_bias(3.0)))
        await until_serving(svc, v3)  # a new publish is followed again


async def test_pin_holds_a_version_against_publishes_and_unpin_follows_latest_again(
    svc: Service, tmp_path: Path
) -> None:
    async with svc.client("admin") as c:
        status = await admin(c, "Pin", model="annotator", version="v1")
        assert (status.model_version, status.pinned_version) == ("v1", "v1")
        v3 = await svc.publish("annotator", variant(svc.store.path("annotator", "v0"), tmp_path / "a3", head_bias(3.0)))
        await settle(svc)
        assert await serving(svc) == "v1"  # still the pinned version

        listed = await admin(c, "ListVersions", model="annotator")
        assert listed.serving_version == "v1"
        marks = {v.version: (v.serving, v.pinned, v.latest) for v in listed.versions}
        assert marks == {
            "v0": (False, False, False),
            "v1": (True, True, False),
            "v2": (False, False, False),
            v3: (False, False, True),
        }
        assert [v.parent for v in listed.versions][-1] == "" and listed.versions[0].created

        # A push while pinned moves the pin with it.
        status = await admin(c, "LoadVersion", model="annotator", version="v2")
        assert (status.model_version, status.pinned_version) == ("v2", "v2")

        status = await admin(c, "Unpin", model="annotator")
        assert status.pinned_version == ""
        await until_serving(svc, v3)
        # Pin with no version pins what serves now.
        status = await admin(c, "Pin", model="annotator")
        assert (status.model_version, status.pinned_version) == (v3, v3)


async def test_rollback_returns_to_the_previous_version_and_keeps_it(svc: Service, tmp_path: Path) -> None:
    async with svc.client("admin") as c:
        code, details = await code_of(admin(c, "Rollback", model="annotator"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "no earlier version" in details
        await asyncio.to_thread(svc.store.set_latest, "annotator", "v1")
        await until_serving(svc, "v1")
        await asyncio.to_thread(svc.store.set_latest, "annotator", "v2")
        await until_serving(svc, "v2")

        status = await admin(c, "Rollback", model="annotator")
        assert (status.model_version, status.previous_version, status.pinned_version) == ("v1", "v2", "v1")
        await settle(svc)
        assert await serving(svc) == "v1"  # LATEST is still v2: the rollback holds
        status = await admin(c, "Rollback", model="annotator")
        assert status.model_version == "v0"


async def test_a_refused_push_is_failed_precondition_and_the_old_version_serves(svc: Service, tmp_path: Path) -> None:
    bad = await svc.publish(
        "annotator",
        variant(svc.store.path("annotator", "v0"), tmp_path / "bad", _wrong_shape),
        set_latest=False,
    )
    async with svc.client("admin") as c:
        code, details = await code_of(admin(c, "LoadVersion", model="annotator", version=bad))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"annotator {bad} refused" in details and "has shape (48, 32)" in details
        listed = await admin(c, "ListVersions", model="annotator")
        assert listed.serving_version == "v0"
    assert await serving(svc) == "v0"
