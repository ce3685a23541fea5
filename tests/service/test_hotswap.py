"""Zero-downtime hot-swap: the policy service over real gRPC with tiny models, under continuous load
from 16 clients while new versions are published; refusal of bad versions while the old one keeps
answering; the two-copy memory bound; `model_verify.verify_folder` and `loopserve models publish`;
the push path (a file-system event, not a poll), weights checked in the one pass that reads them, and
head-only versions that reuse the serving encoder."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import re
import shutil
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from safetensors.torch import load_file, save_file

from loopserve import heap
from loopserve.auth import read_token
from loopserve.cli import command as cli
from loopserve.client import AsyncClient, RetryPolicy
from loopserve.config import POLICY_SERVICE, PolicyConfig
from loopserve.errors import Unavailable, VerificationError
from loopserve.models import encoder_heads
from loopserve.models.encoder_heads import HeadSpec, LabelSpec
from loopserve.models.slot import ModelSlot
from loopserve.models.staging import publish_staged
from loopserve.models.store import MANIFEST, ModelStore
from loopserve.models.verify import verify_folder
from policy_service.app import PolicyApp
from policy_service.runtime import PolicyRuntime, RuntimeOptions
from tests.support import tiny_models
from tests.support.waiting import wait_until

NO_RETRY = RetryPolicy(attempts=1)  # a failed request must show, not be retried away
CLIENTS = 16
TEXTS = ["The tea arrived quickly and tastes great.", "Stale and overpriced, would not buy again."]
SERVING = health_pb2.HealthCheckResponse.SERVING


# ---- helpers (also used by tests/service/test_admin.py) ----------------------------------------------------


def variant(
    src: Path, dest: Path, change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
) -> Path:
    """A copy of a version folder (without its manifest) whose weights `change` rewrites."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(MANIFEST))
    if change is not None:
        weights = dest / "model.safetensors"
        save_file(change(load_file(str(weights))), str(weights), metadata={"format": "pt"})
    return dest


def head_bias(value: float) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """An annotator whose scores differ from every other version's (label 0's logit moved)."""

    def change(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state["head.bias"] = torch.tensor([value, 0.0])
        return state

    return change


def scale(name: str, factor: float) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    def change(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state[name] = state[name] * factor
        return state

    return change


def swaps(model: str, result: str) -> float:
    return REGISTRY.get_sample_value("loopserve_swaps_total", {"model": model, "result": result}) or 0.0


def config(data_dir: Path, **kw: Any) -> PolicyConfig:
    base = PolicyConfig(
        data_dir=data_dir, port=0, metrics_port=-1, max_input_tokens=32, watch_interval_s=0.1, generator=False
    )
    return replace(base, **kw)


class Service:
    def __init__(self, app: PolicyApp) -> None:
        self.app = app
        self.target = f"127.0.0.1:{app.port}"
        self.store: ModelStore = app.runtime.store
        self.tokens = {r: read_token(app.cfg.token_path, r) for r in ("client", "annotator", "admin")}
        self.loads: list[Load] = []

    def client(self, role: str = "client") -> AsyncClient:
        return AsyncClient(self.target, self.tokens[role], retry=NO_RETRY, timeout_s=30)

    async def health(self) -> int:
        async with aio.insecure_channel(self.target) as ch:
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=POLICY_SERVICE))
            return r.status

    async def publish(self, model: str, src: Path, **kw: Any) -> str:
        manifest = await asyncio.to_thread(self.store.publish_version, model, src, **kw)
        return manifest.version

    async def stop(self) -> None:
        for load in self.loads:
            await load.stop()
        await self.app.stop(1)
        for slot in self.app.runtime.slots().values():
            slot.close()


@pytest.fixture
async def service_factory(tiny_data_dir: Path) -> AsyncIterator[Callable[..., Awaitable[Service]]]:
    started: list[Service] = []

    async def start(**kw: Any) -> Service:
        app = PolicyApp(config(tiny_data_dir, **kw))
        await app.start()
        started.append(Service(app))
        return started[-1]

    yield start
    for s in started:
        await s.stop()


@dataclass
class Record:
    start: float
    end: float
    version: str
    value: float


class Load:
    """`clients` concurrent callers in closed loops; every response (or error) is recorded."""

    def __init__(self, svc: Service, call: Callable[[AsyncClient], Awaitable[tuple[str, float]]], clients: int) -> None:
        self.svc = svc
        self.call = call
        self.clients = clients
        self.records: list[Record] = []
        self.errors: list[BaseException] = []
        self.health: list[int] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        svc.loads.append(self)  # stopped before the service, even when a test fails half-way

    async def _client(self) -> None:
        async with self.svc.client() as c:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    version, value = await self.call(c)
                except Exception as e:  # every failure is a test failure, shown below
                    self.errors.append(e)
                    continue
                self.records.append(Record(t0, time.monotonic(), version, value))

    async def _probe(self) -> None:
        while not self._stop.is_set():
            try:
                self.health.append(await self.svc.health())
            except aio.AioRpcError as e:  # recorded: health must stay SERVING, reachable, all along
                self.health.append(-e.code().value[0])
            await asyncio.sleep(0.05)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        self._tasks.append(asyncio.create_task(self._probe()))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def wait_for(self, version: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(r.version == version for r in self.records[-self.clients :]):
            assert time.monotonic() < deadline, f"{version} never served; last {self.records[-1:]}"
            await asyncio.sleep(0.02)


async def annotate_call(c: AsyncClient) -> tuple[str, float]:
    r = await c.annotate(TEXTS[:1])
    scores = {lb.label: lb.score for lb in r.annotations[0].labels}
    return r.model_version, scores[tiny_models.LABELS[0].name]


async def generate_call(c: AsyncClient) -> tuple[str, float]:
    r = await c.generate("Tell me about tea.", max_new_tokens=4, temperature=0.0, logprobs=True)
    return r.model_version, r.completions[0].sequence_logprob


async def publish_under_load(
    svc: Service, load: Load, model: str, dirs: list[Path], gap_s: float
) -> tuple[list[str], float]:
    published = []
    for d in dirs:
        await asyncio.sleep(gap_s)
        published.append(await svc.publish(model, d, parent=published[-1] if published else "v0"))
    return published, time.monotonic()


async def check_swaps_under_load(
    svc: Service, load: Load, published: list[str], last_publish: float, min_versions: int
) -> None:
    """Keep the load on for 3 s after the last publish, then check what every response named."""
    await asyncio.sleep(max(0.0, last_publish + 3.0 - time.monotonic()))
    await load.stop()
    assert not load.errors, f"{len(load.errors)} failed requests, e.g. {load.errors[0]!r}"
    versions = {r.version for r in load.records}
    assert versions <= {"v0", *published}, versions - {"v0", *published}
    assert len(versions) >= min_versions, "the swaps did not happen while the clients were calling"
    late = [r for r in load.records if r.start >= last_publish + 2.0]
    assert len(late) >= CLIENTS, "too few requests in the last second to judge"
    assert {r.version for r in late} == {published[-1]}
    assert set(load.health) == {SERVING}, "health left SERVING during a swap"


async def test_annotator_swaps_ten_versions_under_16_clients_without_a_failed_request(
    service_factory: Callable[..., Awaitable[Service]], tmp_path: Path
) -> None:
    svc = await service_factory()
    v0 = svc.store.path("annotator", "v0")
    dirs = [variant(v0, tmp_path / f"a{i}", head_bias(0.5 * i)) for i in range(1, 11)]
    ok_before = swaps("annotator", "ok")
    load = Load(svc, annotate_call, CLIENTS)
    load.start()
    await load.wait_for("v0")
    published, last_publish = await publish_under_load(svc, load, "annotator", dirs, gap_s=0.3)
    assert published == [f"v{i}" for i in range(1, 11)]
    await check_swaps_under_load(svc, load, published, last_publish, min_versions=4)
    # No response mixes versions: the same text gets its version's score, and versions differ.
    by_version: dict[str, list[float]] = {}
    for r in load.records:
        by_version.setdefault(r.version, []).append(r.value)
    assert all(max(v) - min(v) < 1e-4 for v in by_version.values()), by_version
    means = sorted(sum(v) / len(v) for v in by_version.values())
    assert all(b - a > 1e-3 for a, b in itertools.pairwise(means))
    assert swaps("annotator", "ok") - ok_before >= 2


async def test_generator_swaps_under_16_clients_without_a_failed_request(
    service_factory: Callable[..., Awaitable[Service]], tmp_path: Path
) -> None:
    svc = await service_factory(generator=True)
    v0 = svc.store.path("generator", "v0")
    dirs = [variant(v0, tmp_path / f"g{i}", scale("model.norm.weight", 1.0 + 0.5 * i)) for i in range(1, 4)]
    load = Load(svc, generate_call, CLIENTS)
    load.start()
    await load.wait_for("v0")
    published, last_publish = await publish_under_load(svc, load, "generator", dirs, gap_s=0.5)
    await check_swaps_under_load(svc, load, published, last_publish, min_versions=2)


# ---- refusal: the old version keeps answering -------------------------------------------------------


def _drop_tensor(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    del state["encoder.encoder.layer.1.output.dense.weight"]
    return state


def _wrong_shape(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state["encoder.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(48, 32)
    return state


def _nan_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state["head.weight"] = torch.full_like(state["head.weight"], float("nan"))
    return state


async def test_bad_versions_are_refused_while_the_old_version_keeps_answering(
    service_factory: Callable[..., Awaitable[Service]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="loopserve.models.slot")
    svc = await service_factory()
    slot = svc.app.runtime.annotator
    v0 = svc.store.path("annotator", "v0")
    three_labels = [*tiny_models.LABELS, LabelSpec("spam", "not a review")]
    load = Load(svc, annotate_call, 4)
    load.start()
    await load.wait_for("v0")
    failed_before = swaps("annotator", "failed")

    cases: list[tuple[str, Path, str]] = [
        ("corrupted weights", variant(v0, tmp_path / "corrupt"), "checksum mismatch in model.safetensors"),
        ("missing tensor", variant(v0, tmp_path / "missing", _drop_tensor), "parameters missing"),
        ("wrong shape", variant(v0, tmp_path / "shape", _wrong_shape), "has shape (48, 32)"),
        ("NaN weights", variant(v0, tmp_path / "nan", _nan_head), "holds NaN or infinite values"),
        (
            "label set change, undeclared",
            tiny_models.tiny_annotator(tmp_path / "labels", labels=three_labels),
            "label set changed",
        ),
    ]
    for what, folder, reason in cases:
        if what == "corrupted weights":
            # The file changes after publish (bit rot, a bad copy). Pinned meanwhile, so that the watch
            # does not stage the version before it rots (a staged copy holds the bytes it verified).
            await slot.call(slot.pin)
        version = await svc.publish("annotator", folder, set_latest=False)
        if what == "corrupted weights":
            weights = svc.store.path("annotator", version) / "model.safetensors"
            data = bytearray(weights.read_bytes())
            data[len(data) // 2] ^= 0x01
            weights.write_bytes(bytes(data))
            await asyncio.to_thread(svc.store.set_latest, "annotator", version)
            await slot.call(slot.unpin)
        else:  # staged (and refused) as a candidate, or refused when LATEST names it: the same checks
            await asyncio.to_thread(svc.store.set_latest, "annotator", version)
        deadline = time.monotonic() + 20
        while version not in slot.failed:
            assert time.monotonic() < deadline, f"{what}: {version} was neither refused nor served"
            await asyncio.sleep(0.05)
        assert reason in slot.failed[version], (what, slot.failed[version])
        assert any(
            reason in r.getMessage() and f"refused annotator {version}" in r.getMessage() for r in caplog.records
        )
        await asyncio.sleep(0.3)  # several watch polls: the refused version is not retried
        assert slot.current.version == "v0"

    assert swaps("annotator", "failed") - failed_before == len(cases)
    # A declared label-set change is accepted.
    good = await svc.publish("annotator", tmp_path / "labels", meta={"label_set_change": True})
    await load.wait_for(good)
    await load.stop()
    assert not load.errors, load.errors[0]
    assert {r.version for r in load.records} == {"v0", good}
    assert set(load.health) == {SERVING}
    async with svc.client() as c:
        r = await c.annotate(TEXTS)
        assert r.model_version == good and len(r.annotations[0].labels) == 3


# ---- the slot alone: memory bound, in-flight handles, retries ---------------------------------------


class Weights:
    """Stands in for a loaded model; every live copy is counted."""

    live: weakref.WeakSet[Weights] = weakref.WeakSet()

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.version = folder.name
        Weights.live.add(self)

    @staticmethod
    def alive(store: ModelStore) -> list[str]:
        return sorted(w.version for w in Weights.live if w.folder.is_relative_to(store.root))


def fake_version(dest: Path, value: float) -> Path:
    dest.mkdir(parents=True)
    save_file({"w": torch.full((2, 2), value)}, str(dest / "model.safetensors"))
    return dest


@pytest.fixture
def fake_slot(tmp_path: Path) -> ModelSlot[Weights]:
    store = ModelStore(tmp_path / "store")
    store.publish_version("m", fake_version(tmp_path / "w0", 0.0))
    slot: ModelSlot[Weights] = ModelSlot("m", store, lambda reader, serving: Weights(reader.folder), retire_timeout_s=5)
    slot.load_latest()
    yield slot
    slot.close()


def _waiting_for_retired(thread: threading.Thread) -> bool:
    """Whether `thread` is inside ModelSlot._wait_for_retired right now."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == "_wait_for_retired":
            return True
        frame = frame.f_back
    return False


def test_a_swap_waits_for_the_retired_copy_so_at_most_two_copies_live(
    fake_slot: ModelSlot[Weights], tmp_path: Path
) -> None:
    store = fake_slot.store
    in_flight = fake_slot.current  # a request admitted on v0, still running
    store.publish_version("m", fake_version(tmp_path / "w1", 1.0))
    assert fake_slot.poll_once() and fake_slot.current.version == "v1"
    assert in_flight.model.version == "v0"  # the request finishes on the version it started with
    store.publish_version("m", fake_version(tmp_path / "w2", 2.0))

    swapper = threading.Thread(target=fake_slot.poll_once)
    swapper.start()
    # The swap to v2 blocks until v0 is freed: wait until the swapper is waiting there, then look.
    wait_until(lambda: _waiting_for_retired(swapper), 10, "the swapper to wait for the retired copy")
    most = len(Weights.alive(store))
    assert fake_slot.current.version == "v1", "loaded a third copy while v0 was still in use"
    del in_flight  # the last request on v0 ends
    swapper.join(5)
    assert fake_slot.current.version == "v2"
    assert most == 2
    assert len(Weights.alive(store)) <= 2


def test_a_retired_copy_that_only_a_frozen_cycle_holds_is_freed_by_the_swap(
    fake_slot: ModelSlot[Weights], tmp_path: Path
) -> None:
    """The services freeze their startup objects (loopserve.heap), the first model version among them;
    a cycle holding that version is then invisible to ordinary collections, and the swap that waits for
    it must still find it rather than time out."""
    store = fake_slot.store
    cycle: list[object] = [fake_slot.current]  # a request's state on v0 caught in a reference cycle
    cycle.append(cycle)
    store.publish_version("m", fake_version(tmp_path / "w1", 1.0))
    assert fake_slot.poll_once() and fake_slot.current.version == "v1"
    try:
        heap.freeze_startup_objects()
        del cycle  # v0 is now garbage that only a full collection over frozen objects finds
        store.publish_version("m", fake_version(tmp_path / "w2", 2.0))
        assert fake_slot.poll_once() and fake_slot.current.version == "v2"
        assert "v0" not in Weights.alive(store)
        assert gc.get_freeze_count() > 0  # frozen again after that collection
    finally:
        gc.unfreeze()


def test_a_retired_version_is_freed_by_reference_counting_alone(tmp_path: Path, tiny_data_dir: Path) -> None:
    """The services freeze their startup objects (loopserve.heap), the first versions among them: once
    retired, an annotator or generator bundle must go away without the cyclic collector (no reference
    cycle inside it), or it would stay in memory until the next swap's full collection."""
    store = ModelStore(tiny_data_dir / "store")
    runtime = PolicyRuntime(store, RuntimeOptions(torch.device("cpu"), torch.float32))
    runtime.load()
    assert runtime.generator is not None
    first = [weakref.ref(runtime.annotator.current.model), weakref.ref(runtime.generator.current.model)]
    a1 = store.publish_version("annotator", variant(store.path("annotator", "v0"), tmp_path / "a1", head_bias(0.3)))
    g1 = store.publish_version("generator", store.path("generator", "v0"))
    gc.disable()
    try:
        assert [ref() is None for ref in first] == [False, False]
        runtime.annotator.load_version(a1.version)
        runtime.generator.load_version(g1.version)
        assert [ref() is None for ref in first] == [True, True]
    finally:
        gc.enable()
        runtime.annotator.close()
        runtime.generator.close()


def test_a_retired_copy_held_too_long_defers_the_swap_and_the_watch_retries(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    store.publish_version("m", fake_version(tmp_path / "w0", 0.0))
    slot: ModelSlot[Weights] = ModelSlot(
        "m", store, lambda reader, serving: Weights(reader.folder), retire_timeout_s=0.2
    )
    try:
        slot.load_latest()
        stuck = slot.current
        store.publish_version("m", fake_version(tmp_path / "w1", 1.0))
        assert slot.poll_once()
        store.publish_version("m", fake_version(tmp_path / "w2", 2.0))
        with pytest.raises(Unavailable, match="still has requests in flight"):
            slot.load_version("v2")
        assert not slot.poll_once() and slot.current.version == "v1"
        del stuck
        assert slot.poll_once() and slot.current.version == "v2"
        assert "v2" not in slot.failed  # deferred, never counted as a refusal
    finally:
        slot.close()


def test_a_refused_version_is_not_retried_by_the_watch_but_can_be_pushed_again(
    fake_slot: ModelSlot[Weights], tmp_path: Path
) -> None:
    store = fake_slot.store
    store.publish_version("m", fake_version(tmp_path / "w1", 1.0), set_latest=False)
    (store.path("m", "v1") / "model.safetensors").write_bytes(b"tampered")
    store.set_latest("m", "v1")
    before = swaps("m", "failed")
    assert not fake_slot.poll_once()
    assert not fake_slot.poll_once()
    assert swaps("m", "failed") - before == 1  # counted once: the watch does not retry it
    with pytest.raises(VerificationError, match="checksum mismatch"):
        fake_slot.load_version("v1")  # an explicit push tries again (and is refused again)
    assert fake_slot.current.version == "v0"


# ---- model_verify and `loopserve models publish` ----------------------------------------------------


def test_verify_folder_accepts_a_good_version_and_says_why_it_refuses_a_bad_one(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    store = ModelStore(tiny_data_dir / "store")
    v0 = store.path("annotator", "v0")
    assert "matches against annotator v0" in verify_folder(
        "annotator", variant(v0, tmp_path / "ok", head_bias(1.0)), store
    )
    three = tiny_models.tiny_annotator(tmp_path / "three", labels=[*tiny_models.LABELS, LabelSpec("x", "x")])
    with pytest.raises(VerificationError, match="label set changed"):
        verify_folder("annotator", three, store)
    verify_folder("annotator", three, store, meta={"label_set_change": True})
    with pytest.raises(VerificationError, match="holds a 'reward' head"):
        verify_folder("annotator", store.path("reward", "v0"), store)
    with pytest.raises(VerificationError, match="parameters missing"):
        verify_folder("annotator", variant(v0, tmp_path / "missing", _drop_tensor), store)
    bigger = tiny_models.tiny_generator(tmp_path / "gen")
    assert "generator" in verify_folder("generator", bigger, store)
    pickle = variant(v0, tmp_path / "pickle")
    (pickle / "pytorch_model.bin").write_bytes(b"not allowed")
    with pytest.raises(VerificationError, match="never pickle"):
        verify_folder("annotator", pickle, store)


def test_the_publish_command_verifies_before_it_publishes(
    tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ModelStore(tiny_data_dir / "store")
    v0 = store.path("annotator", "v0")
    args = ["models", "publish", "--data-dir", str(tiny_data_dir), "--model", "annotator", "--from"]
    assert cli.main([*args, str(variant(v0, tmp_path / "ok", head_bias(1.0)))]) == 0
    assert "published annotator v1 (parent v0)" in capsys.readouterr().out
    assert store.latest("annotator") == "v1" and store.get("annotator", "v1").parent == "v0"
    assert cli.main([*args, str(variant(v0, tmp_path / "bad", _wrong_shape))]) == 2
    assert "has shape (48, 32)" in capsys.readouterr().err
    assert store.list("annotator") == ["v0", "v1"]


async def test_a_two_phase_publish_is_staged_beside_the_serving_version_then_switched_in_one_step(
    service_factory: Callable[..., Awaitable[Service]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.INFO, logger="loopserve.models.slot")
    svc = await service_factory(watch_interval_s=3600.0)  # no polls: the new folder's event wakes the watch
    slot = svc.app.runtime.annotator
    v0 = svc.store.path("annotator", "v0")
    load = Load(svc, annotate_call, 4)
    load.start()
    await load.wait_for("v0")
    v0_tokenizer = slot.current.model.tokenizer

    staged_before = swaps("annotator", "staged")
    src = variant(v0, tmp_path / "a1", head_bias(0.9))
    manifest, staging = await asyncio.to_thread(publish_staged, svc.store, "annotator", src, stage_wait_s=30)
    v1 = manifest.version
    assert staging is not None and len(staging.staged) == 1 and not staging.waiting, staging
    await load.wait_for(v1)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"staged annotator {v1} beside v0") for m in messages), messages
    assert any(f"swapped annotator to {v1}" in m and "staged before LATEST moved" in m for m in messages), messages
    assert swaps("annotator", "staged") - staged_before == 1
    # v1 kept v0's tokenizer files: it gets a copy of v0's tokenizer, never the object itself, which the
    # serving thread kept using while the loader smoke-tested v1 with other settings (a CI flake).
    assert slot.current.model.tokenizer is not v0_tokenizer
    assert slot.current.model.tokenizer("tea, fine")["input_ids"] == v0_tokenizer("tea, fine")["input_ids"]

    # A candidate the service refuses while staging it is withdrawn: never LATEST, never served.
    with pytest.raises(VerificationError, match=r"withdrawn: 1 service\(s\) refused it .*NaN or infinite"):
        await asyncio.to_thread(
            publish_staged, svc.store, "annotator", variant(v0, tmp_path / "nan", _nan_head), stage_wait_s=30
        )
    assert svc.store.latest("annotator") == v1 and svc.store.list("annotator") == ["v0", v1]
    assert slot.current.version == v1

    # The operator's command: `--stage-wait-s 0` publishes in one step, the default waits for the service.
    args = ["models", "publish", "--data-dir", str(svc.app.cfg.data_dir), "--model", "annotator", "--from"]
    one_step = [*args, str(variant(v0, tmp_path / "a3", head_bias(0.7))), "--stage-wait-s", "0"]
    assert await asyncio.to_thread(cli.main, one_step) == 0
    assert capsys.readouterr().out.strip() == f"published annotator v3 (parent {v1})"
    await load.wait_for("v3")
    assert await asyncio.to_thread(cli.main, [*args, str(variant(v0, tmp_path / "a4", head_bias(0.5)))]) == 0
    assert re.fullmatch(
        r"published annotator v4 \(parent v3; 1 service\(s\) staged it in [0-9.]+s\)\n", capsys.readouterr().out
    )
    await load.wait_for("v4")
    await load.stop()
    assert not load.errors, f"{len(load.errors)} failed requests, e.g. {load.errors[0]!r}"
    assert {r.version for r in load.records} <= {"v0", v1, "v3", "v4"}
    assert set(load.health) == {SERVING}


# ---- push, verify once, load only what changed ---------------------------------------------------


async def test_with_an_hour_between_polls_a_publish_is_still_served_at_once(
    service_factory: Callable[..., Awaitable[Service]], tmp_path: Path
) -> None:
    svc = await service_factory(watch_interval_s=3600.0)  # only the file-system event can trigger it
    load = Load(svc, annotate_call, 4)
    load.start()
    await load.wait_for("v0")
    version = await svc.publish(
        "annotator", variant(svc.store.path("annotator", "v0"), tmp_path / "a1", head_bias(0.9))
    )
    await load.wait_for(version)
    await load.stop()
    assert not load.errors, f"{len(load.errors)} failed requests, e.g. {load.errors[0]!r}"
    assert {r.version for r in load.records} == {"v0", version}


async def test_with_file_events_off_only_the_poll_swaps(
    service_factory: Callable[..., Awaitable[Service]], tmp_path: Path
) -> None:
    _, flags = cli.parse_command(["policy", "--no-watch-events", "--watch-interval-s", "3600"], environ={})
    assert flags.watch_events is False
    svc = await service_factory(watch_interval_s=flags.watch_interval_s, watch_events=flags.watch_events)
    slot = svc.app.runtime.annotator
    version = await svc.publish(
        "annotator", variant(svc.store.path("annotator", "v0"), tmp_path / "a1", head_bias(0.9))
    )
    await asyncio.sleep(1.0)  # an event-driven watch swaps within milliseconds (the test above)
    assert slot.current.version == "v0", "swapped without an event and without a poll"
    assert await slot.call(slot.poll_once)  # the poll, when it comes, does swap
    assert slot.current.version == version


def test_weights_are_read_once_and_a_file_changed_after_publish_is_refused_as_it_streams(
    tmp_path: Path, tiny_data_dir: Path
) -> None:
    store = ModelStore(tiny_data_dir / "store")
    runtime = PolicyRuntime(store, RuntimeOptions(torch.device("cpu"), torch.float32, generator=False))
    runtime.load()
    v0 = store.path("annotator", "v0")
    good = store.publish_version("annotator", variant(v0, tmp_path / "good", head_bias(0.3)), parent="v0").version
    runtime.annotator.load_version(good)
    weights = store.path("annotator", good) / encoder_heads.WEIGHTS_FILE
    bad = store.publish_version("annotator", variant(v0, tmp_path / "bad", head_bias(0.6)), parent=good).version
    target = store.path("annotator", bad) / encoder_heads.WEIGHTS_FILE
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x10  # one bit of a weight flips after publish: a bad copy, bit rot
    target.write_bytes(bytes(data))
    reader = store.reader("annotator", bad)
    with pytest.raises(VerificationError, match=re.escape("checksum mismatch in model.safetensors")):
        reader.read(encoder_heads.WEIGHTS_FILE)
    with pytest.raises(VerificationError, match=re.escape("checksum mismatch in model.safetensors")):
        runtime.annotator.load_version(bad)
    assert runtime.annotator.current.version == good
    # One pass: the loader read each weight byte exactly once, and nothing was re-hashed afterwards.
    reader = store.reader("annotator", good)
    runtime._load_annotator(reader, None)
    reader.check_rest()
    assert reader.bytes_read == weights.stat().st_size
    assert reader.read_files == {encoder_heads.WEIGHTS_FILE}
    runtime.annotator.close()


async def test_a_head_only_version_reuses_the_serving_encoder_and_answers_with_its_new_head(
    service_factory: Callable[..., Awaitable[Service]], tmp_path: Path
) -> None:
    svc = await service_factory()
    slot = svc.app.runtime.annotator
    serving = slot.current
    v0 = svc.store.path("annotator", "v0")
    new_head = torch.nn.Linear(serving.model.model.head.in_features, serving.model.model.head.out_features)
    torch.nn.init.normal_(new_head.weight, std=5.0)
    spec = replace(HeadSpec.read(v0), temperature=0.5)
    src = tmp_path / "head"
    shared = encoder_heads.save_head(new_head, spec, src, v0)
    assert encoder_heads.WEIGHTS_FILE in shared
    load = Load(svc, annotate_call, 4)
    load.start()
    await load.wait_for("v0")
    version = await svc.publish("annotator", src, parent="v0", shared_files=shared)
    await load.wait_for(version)
    await load.stop()
    assert not load.errors, f"{len(load.errors)} failed requests, e.g. {load.errors[0]!r}"
    now = slot.current
    assert now.version == version
    assert now.model.model.encoder is serving.model.model.encoder  # reused, not read again
    # The tokenizer is copied, not shared: the serving thread and the loader call it with other settings.
    assert now.model.tokenizer is not serving.model.tokenizer
    assert now.model.tokenizer(TEXTS[0])["input_ids"] == serving.model.tokenizer(TEXTS[0])["input_ids"]
    # Its answers are the new head's: the same as a full, independent load of that version gives (in the
    # precision the service serves in; bf16 rounds differently with other padding, so the bar is looser).
    opts = svc.app.runtime.opts
    full = encoder_heads.load(svc.store.path("annotator", version), opts.device, opts.dtype)
    tolerance = 1e-4 if opts.dtype == torch.float32 else 1e-2
    tok = encoder_heads.load_tokenizer(svc.store.path("annotator", version))
    batch = tok(TEXTS[:1], return_tensors="pt", truncation=True, max_length=32)
    with torch.inference_mode():
        want = torch.softmax(
            full(batch["input_ids"], batch["attention_mask"], token_type_ids=batch["token_type_ids"]), -1
        )
    got = [r.value for r in load.records if r.version == version]
    old = [r.value for r in load.records if r.version == "v0"]
    assert abs(got[0] - float(want[0, 0])) < tolerance
    assert abs(got[0] - old[0]) > 10 * tolerance  # the head did change what it answers
