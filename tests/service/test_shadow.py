"""Shadow mode over real gRPC with tiny models (policy_service/shadow.py, ModelAdmin *Shadow RPCs).

- A candidate started beside the serving version answers copies of live Annotate traffic, and its
  answers never reach a client nor the decision log: every response and every logged decision names
  the serving version with the serving version's scores; the evidence (items, agreement, confidence)
  is in GetShadow and the metrics, and the log lines carry no text.
- PromoteShadow under load from 16 clients, then Rollback: no failed request, health SERVING all
  along, the new version serves after the promotion and the old one after the rollback.
- `--shadow-promote-agreement` / `--shadow-min-items`, as `loopserve up` hands them to the policy
  process: a candidate that agrees enough is promoted by itself, one that does not never is;
  `--shadow-fraction 0` copies nothing. Only the admin role may call the shadow RPCs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from loopserve.admin.v1 import admin_pb2 as pb
from loopserve.cli import command as cli
from loopserve.cli.up import policy_config
from loopserve.config import to_argv
from loopserve.feedback_log import open_feedback_log
from tests.service.test_admin import code_of
from tests.service.test_hotswap import (
    CLIENTS,
    SERVING,
    TEXTS,
    Load,
    Service,
    annotate_call,
    head_bias,
    service_factory,
    variant,
)

__all__ = ["service_factory"]


def shadow_items(result: str) -> float:
    return REGISTRY.get_sample_value("loopserve_shadow_items_total", {"result": result}) or 0.0


async def until_items(svc: Service, n: int, timeout_s: float = 30) -> pb.ShadowStatus:
    deadline = time.monotonic() + timeout_s
    async with svc.client("admin") as a:
        while True:
            st = await a.get_shadow("annotator")
            if st.items >= n:
                return st
            assert time.monotonic() < deadline, f"the shadow answered {st.items} items, expected {n}"
            await asyncio.sleep(0.05)


async def top_label(svc: Service, text: str) -> str:
    async with svc.client() as c:
        a = (await c.annotate([text])).annotations[0]
    return max(a.labels, key=lambda lb: lb.score).label


async def test_shadow_answers_never_reach_the_client_or_the_log(
    service_factory: Callable[..., Awaitable[Service]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    svc = await service_factory()
    v0 = svc.store.path("annotator", "v0")
    await svc.publish("annotator", variant(v0, tmp_path / "a1", head_bias(6.0)), set_latest=False)
    async with svc.client() as c:
        before = {a.item_id: [(lb.label, lb.score) for lb in a.labels] for a in (await c.annotate(TEXTS)).annotations}
    agree0, disagree0 = shadow_items("agree"), shadow_items("disagree")
    caplog.set_level("INFO")
    async with svc.client("admin") as a:
        st = await a.start_shadow("annotator", "v1")
    assert st.candidate_version == "v1" and st.serving_version == "v0" and st.items == 0
    responses = []
    async with svc.client() as c:
        for _ in range(30):
            responses.append(await c.annotate(TEXTS))
    st = await until_items(svc, 60)
    for r in responses:  # the serving version's answers, to the last digit
        assert r.model_version == "v0"
        assert {a.item_id: [(lb.label, lb.score) for lb in a.labels] for a in r.annotations} == before
    assert st.candidate_version == "v1" and 0.0 <= st.agreement <= 1.0 and st.dropped == 0
    assert 0.5 <= st.mean_confidence <= 1.0 and 0.5 <= st.serving_mean_confidence <= 1.0
    assert shadow_items("agree") - agree0 + shadow_items("disagree") - disagree0 >= 60
    # The candidate (label 0's logit +6) answers differently from serving on at least one text.
    assert st.mean_confidence != pytest.approx(st.serving_mean_confidence)
    async with svc.client("admin") as a:
        stopped = await a.stop_shadow("annotator")
        assert stopped.items >= 60 and (await a.get_shadow("annotator")).candidate_version == ""
    svc.app.feedback_log.writer.flush(10)
    with open_feedback_log(svc.app.cfg.feedback_log_url) as log:
        logged = log.get_decisions([a.event_id for r in responses for a in r.annotations])
    assert len(logged) == 60 and {d.model_version for d in logged.values()} == {"v0"}
    assert "shadow annotator v1 started beside v0" in caplog.text
    assert not any(t in caplog.text for t in TEXTS)  # ids and counts only


async def test_promotion_and_rollback_under_load_with_no_failed_request(
    service_factory: Callable[..., Awaitable[Service]], tmp_path: Path
) -> None:
    svc = await service_factory()
    v0 = svc.store.path("annotator", "v0")
    await svc.publish("annotator", variant(v0, tmp_path / "a1", head_bias(1.0)), set_latest=False)
    load = Load(svc, annotate_call, CLIENTS)
    load.start()
    await load.wait_for("v0")
    async with svc.client("admin") as a:
        await a.start_shadow("annotator", "v1")
        await until_items(svc, 100)
        status = await a.promote_shadow("annotator")
        assert (status.model_version, status.previous_version, status.pinned_version) == ("v1", "v0", "v1")
        await load.wait_for("v1")
        assert (await a.get_shadow("annotator")).promoted_version == "v1"
        back = await a.rollback("annotator")
        assert back.model_version == "v0"
        await load.wait_for("v0")
    await asyncio.sleep(0.5)
    await load.stop()
    assert not load.errors, f"{len(load.errors)} failed requests, e.g. {load.errors[0]!r}"
    assert {r.version for r in load.records} == {"v0", "v1"}
    assert set(load.health) == {SERVING}


async def test_a_staged_version_is_not_served_until_its_shadow_is_promoted(
    service_factory: Callable[..., Awaitable[Service]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The operator's flow: `models publish --stage` stores a version without serving it (LATEST stays),
    StartShadow tries it on live traffic, PromoteShadow serves it."""
    svc = await service_factory()
    v0 = svc.store.path("annotator", "v0")
    folder = variant(v0, tmp_path / "a1", head_bias(1.0))
    argv = ["models", "publish", "--stage", "--data-dir", str(svc.store.root.parent), "--model", "annotator"]
    assert await asyncio.to_thread(cli.main, [*argv, "--from", str(folder)]) == 0
    assert "staged annotator v1" in capsys.readouterr().out
    assert svc.store.latest("annotator") == "v0" and svc.store.list("annotator") == ["v0", "v1"]
    unpinned = svc.app.runtime.annotator
    await asyncio.to_thread(unpinned.poll_once)  # what the watch would do: LATEST still names v0
    assert unpinned.current.version == "v0"
    async with svc.client("admin") as a, svc.client() as c:
        await a.start_shadow("annotator", "v1")
        assert (await c.annotate(TEXTS)).model_version == "v0"  # served by v0; a copy goes to v1
        await until_items(svc, len(TEXTS))
        status = await a.promote_shadow("annotator")
        assert status.model_version == "v1"
        assert (await c.annotate(TEXTS)).model_version == "v1"


def _as_up_hands_it(argv: list[str]) -> dict[str, object]:
    _, up = cli.parse_command(["up", *argv], environ={})
    _, cfg = cli.parse_command(["policy", *to_argv(policy_config(up))], environ={})
    return {k: getattr(cfg, k) for k in ("shadow_fraction", "shadow_promote_agreement", "shadow_min_items")}


async def test_the_declared_threshold_promotes_a_candidate_that_agrees_and_never_one_that_does_not(
    service_factory: Callable[..., Awaitable[Service]], tmp_path: Path
) -> None:
    flags = _as_up_hands_it(["--shadow-promote-agreement", "0.95", "--shadow-min-items", "40"])
    assert flags == {"shadow_fraction": 1.0, "shadow_promote_agreement": 0.95, "shadow_min_items": 40}
    svc = await service_factory(**flags)
    v0 = svc.store.path("annotator", "v0")
    first = await top_label(svc, TEXTS[0])
    # v1 pushes the other label hard (disagrees on TEXTS[0]); v2 barely moves (agrees everywhere).
    away = -30.0 if first == "great" else 30.0
    await svc.publish("annotator", variant(v0, tmp_path / "a1", head_bias(away)), set_latest=False)
    await svc.publish("annotator", variant(v0, tmp_path / "a2", head_bias(1e-4)), set_latest=False)
    async with svc.client("admin") as a, svc.client() as c:
        await a.start_shadow("annotator", "v1")
        for _ in range(50):
            await c.annotate(TEXTS[:1])
        st = await until_items(svc, 50)
        assert st.agreement == 0.0 and st.promoted_version == "" and (await c.annotate(TEXTS[:1])).model_version == "v0"
        await a.start_shadow("annotator", "v2")  # replaces the running shadow
        for _ in range(50):
            await c.annotate(TEXTS[:1])
        deadline = time.monotonic() + 30
        while (await c.annotate(TEXTS[:1])).model_version != "v2":
            assert time.monotonic() < deadline, "the agreeing candidate was never promoted"
            await asyncio.sleep(0.05)
        st = await a.get_shadow("annotator")
        assert st.promoted_version == "v2" and st.items >= 40 and st.agreement >= 0.95


async def test_a_promotion_shows_in_get_shadow_as_soon_as_the_candidate_serves(
    service_factory: Callable[..., Awaitable[Service]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slot switches on its loader thread and the promotion's await resumes later on the event loop;
    a client that sees the candidate answer and then asks GetShadow in between must see it promoted (CI
    once saw `promoted_version` empty there)."""
    svc = await service_factory(**_as_up_hands_it([]))
    v0 = svc.store.path("annotator", "v0")
    await svc.publish("annotator", variant(v0, tmp_path / "a1", head_bias(1e-4)), set_latest=False)
    slot = svc.app.runtime.annotator
    switched, release = asyncio.Event(), asyncio.Event()
    real_call = slot.call

    async def call_then_wait(fn: Callable[..., object], *args: object, **kw: object) -> object:
        out = await real_call(fn, *args, **kw)
        if fn == slot.pin:  # the switch is done; hold the promotion's resumption here
            switched.set()
            await release.wait()
        return out

    monkeypatch.setattr(slot, "call", call_then_wait)
    async with svc.client("admin") as a, svc.client() as c:
        await a.start_shadow("annotator", "v1")
        promotion = asyncio.create_task(a.promote_shadow("annotator"))
        await asyncio.wait_for(switched.wait(), 30)
        assert (await c.annotate(TEXTS[:1])).model_version == "v1"
        st = await a.get_shadow("annotator")
        assert st.promoted_version == "v1" and st.serving_version == "v1"
        release.set()
        await promotion
        st = await a.get_shadow("annotator")
        assert st.promoted_version == "v1" and st.candidate_version == "v1"


async def test_shadow_fraction_zero_copies_nothing_and_only_admins_may_shadow(
    service_factory: Callable[..., Awaitable[Service]], tmp_path: Path
) -> None:
    svc = await service_factory(**_as_up_hands_it(["--shadow-fraction", "0"]))
    v0 = svc.store.path("annotator", "v0")
    await svc.publish("annotator", variant(v0, tmp_path / "a1", head_bias(1.0)), set_latest=False)
    async with svc.client() as c:
        code, _ = await code_of(c.start_shadow("annotator", "v1"))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    async with svc.client("admin") as a, svc.client() as c:
        code, msg = await code_of(a.start_shadow("annotator", "v9"))
        assert code == grpc.StatusCode.NOT_FOUND
        code, msg = await code_of(a.promote_shadow("annotator"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "StartShadow" in msg
        await a.start_shadow("annotator", "v1")
        for _ in range(20):
            await c.annotate(TEXTS)
        await asyncio.sleep(0.3)
        assert (await a.get_shadow("annotator")).items == 0
