"""The reward service over real gRPC (service tier): a grpc.aio RewardApp on an ephemeral loopback
port, called with the real loopserve AsyncClient and the tokens from the token file it wrote.

What a user would notice: one finite score per pair in order, naming the version that produced it;
Compare agreeing with Score; every bad request refused as INVALID_ARGUMENT with a message that says
what to fix, with the server still SERVING after; tokens and roles enforced; a newly published
version served once the watch sees it, with no failed request during the swap; the real bundled
reward model served end to end.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loopserve import auth
from loopserve.admin.v1 import admin_pb2
from loopserve.client import AsyncClient
from loopserve.config import REWARD_SERVICE, RewardConfig
from loopserve.device import dtype_name, pick_dtype
from loopserve.models.store import ModelStore
from loopserve.reward.v1 import reward_pb2 as pb
from reward_service.app import RewardApp
from tests.unit.test_reward_runtime import tiny_reward_version

PAIRS = [
    ("What is the capital of France?", "Paris."),
    ("Summarise the review.", "Stale coffee, torn bag; would not buy again."),
    ("Hi", "Hello! How can I help you today?"),
    ("Write a poem", "Roses are red"),
]


def config(data_dir: Path, **kw: object) -> RewardConfig:
    return RewardConfig(data_dir=data_dir, port=0, metrics_port=-1, max_wait_ms=2.0, **kw)  # type: ignore[arg-type]


async def started(cfg: RewardConfig) -> RewardApp:
    app = RewardApp(cfg)
    await app.start()
    return app


def client(app: RewardApp, role: str | None = "client") -> AsyncClient:
    token = auth.read_token(app.cfg.token_path, role) if role else None
    return AsyncClient(f"127.0.0.1:{app.port}", token, timeout_s=30.0)


async def health(app: RewardApp, service: str) -> int:
    async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
        return reply.status


# ---- one server for the read-only tests ------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_v0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_reward_version(tmp_path_factory.mktemp("tiny-v0"))


@pytest.fixture(scope="module")
async def app(tmp_path_factory, tiny_v0) -> AsyncIterator[RewardApp]:
    data_dir = tmp_path_factory.mktemp("reward-data")
    ModelStore(data_dir / "store").publish_version("reward", tiny_v0)
    app = await started(
        config(data_dir, max_pairs_per_request=8, max_text_chars=2000, max_input_tokens=64, encoder_token_budget=96)
    )
    yield app
    await app.stop(grace_s=0)


@pytest.fixture
async def reward(app) -> AsyncIterator[AsyncClient]:
    async with client(app) as c:
        yield c


async def test_score_gives_one_finite_score_per_pair_in_order_and_names_the_version(reward):
    r = await reward.score(PAIRS)
    assert r.model_version == "v0"
    assert len(r.scores) == len(PAIRS)
    assert all(math.isfinite(s) for s in r.scores)
    assert len({round(s, 4) for s in r.scores}) == len(PAIRS)
    backwards = await reward.score(PAIRS[::-1])
    assert list(backwards.scores) == pytest.approx(list(r.scores)[::-1], abs=1e-5)


async def test_concurrent_calls_are_batched_yet_each_gets_its_own_scores(reward):
    alone = [(await reward.score([p])).scores[0] for p in PAIRS]
    together = await asyncio.gather(*(reward.score([p]) for p in PAIRS * 4))
    assert [r.scores[0] for r in together] == pytest.approx(alone * 4, abs=1e-5)


async def test_compare_is_consistent_with_score(reward):
    prompt, a, b = "Is this coffee good?", "Yes, rich and smooth.", "It arrived stale."
    sa, sb = (await reward.score([(prompt, a), (prompt, b)])).scores
    c = await reward.compare(prompt, a, b)
    assert c.model_version == "v0"
    assert (c.score_a, c.score_b) == pytest.approx((sa, sb), abs=1e-5)
    assert c.p_a_preferred == pytest.approx(1 / (1 + math.exp(-(sa - sb))), abs=1e-5)
    swapped = await reward.compare(prompt, b, a)
    assert c.p_a_preferred + swapped.p_a_preferred == pytest.approx(1.0, abs=1e-5)


async def test_model_info_states_the_limits_and_version(reward, app):
    info = await reward.reward.GetModelInfo(pb.GetModelInfoRequest(), metadata=reward.metadata)
    assert (info.model_version, info.max_pairs_per_request, info.max_text_chars, info.max_input_tokens) == (
        "v0",
        8,
        2000,
        64,
    )
    assert info.device == "cpu"
    assert info.dtype == dtype_name(pick_dtype("auto", torch.device("cpu")))  # --dtype auto, resolved
    assert app.runtime.opts.token_budget == 96  # --encoder-token-budget reaches the serving runtime


async def test_long_texts_within_the_character_limit_are_truncated_not_refused(reward):
    r = await reward.score([("word " * 390, "fine"), ("q", "answer " * 280)])
    assert all(math.isfinite(s) for s in r.scores)


BAD_SCORES = [
    ([], "pairs is empty"),
    ([("p", "r")] * 9, "9 pairs in one request; the limit is 8"),
    ([("p", "r"), ("", "r")], "pairs[1].prompt is empty"),
    ([("p", " \n")], "pairs[0].response is empty"),
    ([("p", "x" * 2001)], "pairs[0].response has 2001 characters; the limit is 2000"),
]


@pytest.mark.parametrize(("pairs", "message"), BAD_SCORES)
async def test_bad_score_is_invalid_argument_and_the_server_stays_serving(app, reward, pairs, message):
    with pytest.raises(aio.AioRpcError) as err:
        await reward.score(pairs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")
    for service in ("", REWARD_SERVICE):
        assert await health(app, service) == health_pb2.HealthCheckResponse.SERVING
    assert len((await reward.score(PAIRS[:1])).scores) == 1


@pytest.mark.parametrize(
    ("prompt", "a", "b", "message"),
    [
        ("", "x", "y", "prompt is empty"),
        ("p", "", "y", "a (the first response) is empty"),
        ("p", "x", "y" * 2001, "b (the second response) has 2001 characters"),
    ],
)
async def test_bad_compare_is_invalid_argument_and_the_server_stays_serving(app, reward, prompt, a, b, message):
    with pytest.raises(aio.AioRpcError) as err:
        await reward.compare(prompt, a, b)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")
    assert await health(app, REWARD_SERVICE) == health_pb2.HealthCheckResponse.SERVING


async def test_a_call_without_a_token_is_unauthenticated(app):
    async with client(app, role=None) as anonymous:
        with pytest.raises(aio.AioRpcError) as err:
            await anonymous.score(PAIRS[:1])
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in (err.value.details() or "")
    async with AsyncClient(f"127.0.0.1:{app.port}", "not-a-real-token-at-all") as stranger:
        with pytest.raises(aio.AioRpcError) as err:
            await stranger.compare("p", "a", "b")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_model_admin_needs_the_admin_role(app, reward):
    with pytest.raises(aio.AioRpcError) as err:
        await reward.admin.ListVersions(admin_pb2.ListVersionsRequest(model="reward"), metadata=reward.metadata)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with client(app, role="admin") as admin:
        listing = await admin.admin.ListVersions(admin_pb2.ListVersionsRequest(), metadata=admin.metadata)
    assert (listing.model, listing.serving_version) == ("reward", "v0")


# ---- hot swap: its own server ----------------------------------------------------------------------


async def test_a_published_version_is_served_after_the_watch_sees_it_without_a_failed_call(tmp_path, tiny_v0):
    store = ModelStore(tmp_path / "store")
    store.publish_version("reward", tiny_v0)
    app = await started(config(tmp_path, watch_interval_s=0.1))
    try:
        async with client(app) as c:
            before = list((await c.score(PAIRS)).scores)
            stop = asyncio.Event()
            seen: list[tuple[str, list[float]]] = []

            async def keep_scoring() -> None:  # traffic while the swap happens
                while not stop.is_set():
                    r = await c.score(PAIRS)
                    seen.append((r.model_version, list(r.scores)))

            traffic = [asyncio.create_task(keep_scoring()) for _ in range(3)]
            # The new version: the same encoder, its head's bias moved by +5, so every reward is +5.
            new_dir = tiny_reward_version(tmp_path / "v1", bias=5.0)
            await asyncio.to_thread(store.publish_version, "reward", new_dir, parent="v0")
            deadline = time.monotonic() + 20
            while not any(v == "v1" for v, _ in seen) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*traffic)  # raises if any call failed during the swap

            after = await c.score(PAIRS)
            assert after.model_version == "v1"
            assert list(after.scores) == pytest.approx([s + 5 for s in before], abs=1e-4)
            # Every response is whole on one version: never a mix of old and new scores.
            expected = {"v0": before, "v1": [s + 5 for s in before]}
            assert {v for v, _ in seen} == {"v0", "v1"}
            for version, scores in seen:
                assert scores == pytest.approx(expected[version], abs=1e-4)
    finally:
        await app.stop(grace_s=0)


# ---- the real bundled reward model -----------------------------------------------------------------


@pytest.mark.slow
async def test_the_bundled_reward_model_is_served(real_store: ModelStore, tmp_path: Path) -> None:
    base = real_store.path("reward", real_store.latest("reward") or "v0")
    ModelStore(tmp_path / "store").publish_version("reward", base)
    app = await started(config(tmp_path))
    try:
        async with client(app) as c:
            r = await c.score([*PAIRS, ("word " * 3000, "a response after a prompt far over 256 tokens")])
            assert r.model_version == "v0"
            assert len(r.scores) == len(PAIRS) + 1
            assert all(math.isfinite(s) for s in r.scores)
            # The base version is untrained (zero head): it prefers nothing yet.
            compared = await c.compare("Is this coffee good?", "Yes, rich and smooth.", "It arrived stale.")
            assert compared.p_a_preferred == pytest.approx(0.5, abs=1e-6)
        assert await health(app, REWARD_SERVICE) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await app.stop(grace_s=0)
