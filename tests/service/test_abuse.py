"""Fuzz and abuse suite: what a hostile client or a broken weight must never do to the policy service
(service tier: a real grpc.aio server on loopback with tiny models; bounded, seeded, a few seconds).

- One request's own parameters fail that request alone: a temperature of 1e-40 or 1e-45 beside eight
  well-formed requests in one batch answers like greedy decoding, and everyone is served; one row
  that fails mid-decode leaves the others decoding.
- A non-finite model output is the server's fault: INTERNAL, counted in loopserve_model_faults, never
  INVALID_ARGUMENT, and it fails only the requests it touched.
- A weight file with one NaN row the smoke batch never touches is refused when a version loads (the
  old version keeps serving) and by `loopserve models publish`, in one line naming the file; so is a
  garbled safetensors file.
- Random bodies on every method get a status, never UNKNOWN / INTERNAL or a traceback in the log;
  unauthenticated garbage gets UNAUTHENTICATED before the body is parsed; a corrupt message inside
  SubmitStream ends it with INVALID_ARGUMENT.
- A 100 KB client string is quoted back as a short prefix: the status is the right one, the message
  is bounded, and the client does not retry it; a SubmitStream of 100 rejected 350 KB keys answers
  with a small summary.
- A re-used idempotency key with a different body is acknowledged, not stored, and says it
  conflicted; the SQLite log is created 0600; the decisions queue gauge returns to 0 when idle.
"""

from __future__ import annotations

import asyncio
import logging
import random
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc import aio
from prometheus_client import REGISTRY

from loopserve.admin.v1 import admin_pb2
from loopserve.cli import command as cli
from loopserve.client import AsyncClient
from loopserve.config import ADMIN_SERVICE, FEEDBACK_SERVICE, POLICY_SERVICE
from loopserve.errors import MAX_MESSAGE_CHARS
from loopserve.feedback.v1 import feedback_pb2 as fb
from loopserve.models import encoder_heads, generator
from loopserve.models.store import ModelStore
from loopserve.policy.v1 import policy_pb2
from policy_service import sampling
from policy_service.types import SamplingParams, TokenDelta
from tests.support import tiny_models
from tests.support.policy_harness import Running, policy_config, start_policy
from tests.support.waiting import wait_until

SERVICES = {
    POLICY_SERVICE: policy_pb2.DESCRIPTOR.services_by_name["PolicyService"],
    FEEDBACK_SERVICE: fb.DESCRIPTOR.services_by_name["FeedbackService"],
    ADMIN_SERVICE: admin_pb2.DESCRIPTOR.services_by_name["ModelAdmin"],
}
BAD_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
HUGE = "x" * 100_000
POISON_WORD = "zebra"  # in no smoke text


@pytest.fixture
async def svc(tiny_data_dir: Path) -> AsyncIterator[Running]:
    # A long batch wait: concurrent requests of a test share one generate batch.
    running = await start_policy(policy_config(tiny_data_dir, max_wait_ms=200.0))
    yield running
    await running.app.stop(1)


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def _methods() -> list[tuple[str, str, bool, bool]]:
    """(service, method, client_streaming, server_streaming) of every method the service hosts."""
    return [
        (name, m.name, m.client_streaming, m.server_streaming) for name, desc in SERVICES.items() for m in desc.methods
    ]


def _bidi_call(target: str, path: str, bodies: list[bytes], md: tuple[tuple[str, str], ...]) -> None:
    # The blocking API: when a server ends a bidirectional stream before the client has sent every
    # message, grpc.aio's client can report INTERNAL "Internal error from Core" in place of the
    # server's status (grpc/grpc#36066); the blocking client reports the status the server sent.
    with grpc.insecure_channel(target) as ch:
        for _ in ch.stream_stream(path)(iter(bodies), metadata=md, timeout=30):
            pass


async def _raw_call(
    channel: aio.Channel,
    service: str,
    method: str,
    bodies: list[bytes],
    streaming: tuple[bool, bool],
    token: str,
    target: str = "",
) -> tuple[grpc.StatusCode, str]:
    """Send raw bytes as the request(s) of `method`; the final status code and its message.
    A bidirectional method needs `target` (see `_bidi_call`)."""
    path = f"/{service}/{method}"
    md = (("authorization", f"Bearer {token}"),) if token else ()
    client_streaming, server_streaming = streaming
    try:
        if client_streaming and server_streaming:
            assert target, "a bidirectional call needs the target"
            try:
                await asyncio.to_thread(_bidi_call, target, path, bodies, md)
            except grpc.RpcError as e:
                return e.code(), e.details() or ""  # type: ignore[attr-defined]
        elif client_streaming:
            await channel.stream_unary(path)(iter(bodies), metadata=md, timeout=30)
        elif server_streaming:
            async for _ in channel.unary_stream(path)(bodies[0], metadata=md, timeout=30):
                pass
        else:
            await channel.unary_unary(path)(bodies[0], metadata=md, timeout=30)
    except aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


# ---- isolation: one request's parameters fail nobody else ------------------------------------------


async def test_tiny_temperature_beside_eight_requests_fails_nobody(svc: Running) -> None:
    async with svc.client() as c:

        async def stream(temperature: float) -> str:
            chunks = [m async for m in c.generate_stream("Count to 99.", max_new_tokens=8, temperature=temperature)]
            assert chunks[-1].done and chunks[-1].event_id
            return "".join(m.text for m in chunks)

        normal = [c.generate(f"Say something about tea number {i}.", max_new_tokens=8, seed=i) for i in range(8)]
        tiny = [
            c.generate("Count to 99.", max_new_tokens=8, temperature=1e-40),
            c.generate("Count to 99.", max_new_tokens=8, temperature=1e-45),
        ]
        results = await asyncio.gather(*normal, *tiny, stream(1e-45))
        greedy = await c.generate("Count to 99.", max_new_tokens=8, temperature=0.0)
    for r in results[:10]:
        assert isinstance(r, policy_pb2.GenerateResponse)
        assert r.completions[0].num_tokens > 0 and r.completions[0].event_id
    # The limit of sampling as the temperature goes to 0 is greedy decoding.
    want = greedy.completions[0].text
    assert results[8].completions[0].text == want  # type: ignore[union-attr]
    assert results[9].completions[0].text == want  # type: ignore[union-attr]
    assert results[10] == want


def test_tiny_temperature_distribution_is_finite() -> None:
    logits = torch.randn(1000) * 10
    for temperature in (1e-45, 1e-40, 1e-30, 1e30):
        logp = sampling.sampling_logprobs(logits, SamplingParams(max_new_tokens=1, temperature=temperature))
        assert not bool(torch.isnan(logp).any()) and float(logp.exp().sum()) == pytest.approx(1.0)
    logp = sampling.sampling_logprobs(logits, SamplingParams(max_new_tokens=1, temperature=1e-40))
    assert int(logp.argmax()) == int(logits.argmax()) and float(logp.max()) == pytest.approx(0.0)


def test_a_row_that_fails_mid_decode_leaves_its_batch_decoding(tiny_data_dir: Path) -> None:
    folder = ModelStore(tiny_data_dir / "store").path("generator", "v0")
    model, tok = generator.load(folder), generator.load_tokenizer(folder)

    def explode(delta: TokenDelta) -> None:
        raise RuntimeError("the stream's consumer broke")

    ids = tok("Tell me about tea.", add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_new_tokens=6, temperature=0.8)
    reqs = [sampling.SequenceRequest(list(ids), params, row_seed=i) for i in range(4)]
    reqs[1].on_token = explode
    out = sampling.generate(model, tok, reqs)
    assert isinstance(out[1].error, RuntimeError) and out[1].finish_reason == "error"
    for i in (0, 2, 3):
        assert out[i].error is None and out[i].finish_reason in ("length", "stop") and out[i].token_ids


# ---- server faults: a non-finite output, a broken weight ----------------------------------------------


async def test_non_finite_output_is_internal_counted_and_isolated(
    svc: Running, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = svc.app.runtime.annotator.current.model
    token_id = bundle.tokenizer.convert_tokens_to_ids(POISON_WORD)
    with torch.no_grad():  # a weight gone bad in memory: only texts with this token are touched
        bundle.model.encoder.embeddings.word_embeddings.weight[token_id] = float("nan")
    faults = _sample("loopserve_model_faults_total", {"model": "annotator"})
    async with svc.client() as c:
        bad, good = await asyncio.gather(
            c.annotate([f"This {POISON_WORD} tea is great."]),
            c.annotate(["This tea is great."]),
            return_exceptions=True,
        )
    assert isinstance(bad, aio.AioRpcError) and bad.code() == grpc.StatusCode.INTERNAL
    assert "finite" in (bad.details() or "") and "label score" not in (bad.details() or "")
    assert isinstance(good, policy_pb2.AnnotateResponse) and good.annotations[0].labels
    assert _sample("loopserve_model_faults_total", {"model": "annotator"}) == faults + 1


def _poisoned_annotator(dest: Path, tokenizer_word: str) -> Path:
    tiny_models.tiny_annotator(dest, seed=3)
    model = encoder_heads.load(dest)
    tok = encoder_heads.load_tokenizer(dest)
    with torch.no_grad():
        model.encoder.embeddings.word_embeddings.weight[tok.convert_tokens_to_ids(tokenizer_word)] = float("nan")
    encoder_heads.save(model, tok, dest)
    return dest


def _publish(data_dir: Path, folder: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`loopserve models publish` as a user runs it (in this process: the CLI's main), and its stderr."""
    code = cli.main(["models", "publish", "--model", "annotator", "--from", str(folder), "--data-dir", str(data_dir)])
    return code, capsys.readouterr().err


async def test_nan_weight_row_never_reaches_traffic(svc: Running, tmp_path: Path) -> None:
    store = ModelStore(svc.app.cfg.store_path)
    poisoned = _poisoned_annotator(tmp_path / "poisoned", POISON_WORD)
    # Published behind the verifier's back (a bad disk, a hand copy): the service refuses to load it.
    bad_version = store.publish_version("annotator", poisoned, parent="v0").version
    failed = _sample("loopserve_swaps_total", {"model": "annotator", "result": "failed"})
    async with svc.client("admin") as admin, svc.client() as c:
        with pytest.raises(aio.AioRpcError) as err:
            await admin.load_version("annotator", bad_version)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "model.safetensors" in (err.value.details() or "") and "NaN" in (err.value.details() or "")
        r = await c.annotate([f"This {POISON_WORD} tea is great."])
    assert r.model_version == "v0"  # the old version serves on
    assert _sample("loopserve_swaps_total", {"model": "annotator", "result": "failed"}) >= failed + 1


def test_publish_refuses_nan_and_garbled_weights_in_one_line(
    tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    poisoned = _poisoned_annotator(tmp_path / "poisoned", POISON_WORD)
    code, err = _publish(tiny_data_dir, poisoned, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "model.safetensors" in lines[0] and "NaN" in lines[0], err

    garbled = tiny_models.tiny_annotator(tmp_path / "garbled", seed=4)
    weights = garbled / encoder_heads.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:4096])  # a header, then a truncated body
    code, err = _publish(tiny_data_dir, garbled, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "model.safetensors" in lines[0], err
    assert ModelStore(tiny_data_dir / "store").list("annotator") == ["v0"]  # nothing was published


# ---- bodies that do not parse, with and without a token -------------------------------------------


async def test_random_bodies_on_every_method_get_a_status_not_a_traceback(
    svc: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    rng = random.Random(12)
    malformed = sum(
        _sample("loopserve_malformed_requests_total", {"service": s, "method": m}) for s, m, _, _ in _methods()
    )
    seen: dict[grpc.StatusCode, int] = {}
    async with aio.insecure_channel(svc.target) as ch:
        for service, method, cs, ss in _methods():
            for _ in range(12):
                bodies = [rng.randbytes(rng.randrange(1, 48)) for _ in range(rng.randrange(1, 4))]
                code, details = await _raw_call(ch, service, method, bodies, (cs, ss), svc.tokens["admin"], svc.target)
                assert code not in BAD_CODES, (service, method, code, details)
                assert len(details) <= MAX_MESSAGE_CHARS
                seen[code] = seen.get(code, 0) + 1
    assert seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0
    after = sum(_sample("loopserve_malformed_requests_total", {"service": s, "method": m}) for s, m, _, _ in _methods())
    assert after > malformed  # counted in metrics instead of logged
    assert not _errors(caplog), [r.getMessage() for r in _errors(caplog)]
    async with svc.client() as c:  # and the server still serves
        assert (await c.annotate(["Still here?"])).annotations


async def test_unauthenticated_garbage_is_refused_before_parsing(
    svc: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    garbage = [b"\xff" * 8]
    malformed = sum(
        _sample("loopserve_malformed_requests_total", {"service": s, "method": m}) for s, m, _, _ in _methods()
    )
    async with aio.insecure_channel(svc.target) as ch:
        for service, method, cs, ss in _methods():
            for _ in range(5):
                code, _ = await _raw_call(ch, service, method, garbage, (cs, ss), token="", target=svc.target)
                assert code == grpc.StatusCode.UNAUTHENTICATED, (service, method, code)
            if service == ADMIN_SERVICE:
                code, _ = await _raw_call(ch, service, method, garbage, (cs, ss), svc.tokens["client"], svc.target)
                assert code == grpc.StatusCode.PERMISSION_DENIED, (method, code)
    after = sum(_sample("loopserve_malformed_requests_total", {"service": s, "method": m}) for s, m, _, _ in _methods())
    assert after == malformed  # never parsed
    assert not _errors(caplog), [r.getMessage() for r in _errors(caplog)]


async def test_corrupt_message_inside_submitstream_is_invalid_argument(
    svc: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    good = fb.FeedbackEvent(
        idempotency_key="fine-1", preference=fb.Preference(prompt="p", chosen="a", rejected="b")
    ).SerializeToString()
    async with aio.insecure_channel(svc.target) as ch:
        code, details = await _raw_call(
            ch, FEEDBACK_SERVICE, "SubmitStream", [good, b"\xff" * 8, good], (True, False), svc.tokens["annotator"]
        )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "FeedbackEvent" in details and len(details) < 200
    assert not _errors(caplog), [r.getMessage() for r in _errors(caplog)]


# ---- oversize strings ----------------------------------------------------------------------------------


async def test_oversize_client_strings_are_quoted_short_and_not_retried(svc: Running) -> None:
    def count(service: str, method: str) -> float:
        return sum(
            _sample("loopserve_requests_total", {"service": service, "method": method, "code": code.name})
            for code in grpc.StatusCode
        )

    cases = [
        (POLICY_SERVICE, "Annotate", "client", lambda c: c.annotate(["fine"], task=HUGE)),
        (POLICY_SERVICE, "Annotate", "client", lambda c: c.annotate([(HUGE, "fine")])),
        (POLICY_SERVICE, "Annotate", "client", lambda c: c.annotate([("x" * 200, "")])),
        (ADMIN_SERVICE, "LoadVersion", "admin", lambda c: c.load_version(HUGE, "v1")),
        (ADMIN_SERVICE, "LoadVersion", "admin", lambda c: c.load_version("annotator", HUGE)),
        (ADMIN_SERVICE, "Pin", "admin", lambda c: c.pin("annotator", HUGE)),
        (
            FEEDBACK_SERVICE,
            "Submit",
            "annotator",
            lambda c: c.submit([fb.FeedbackEvent(idempotency_key=HUGE, accept=fb.LabelAccept(event_id="e"))]),
        ),
    ]
    for service, method, role, call in cases:
        before = count(service, method)
        # The client's default retry policy: five attempts on UNAVAILABLE / RESOURCE_EXHAUSTED.
        async with AsyncClient(svc.target, svc.tokens[role]) as c:
            with pytest.raises(aio.AioRpcError) as err:
                await call(c)
        code, details = err.value.code(), err.value.details() or ""
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (method, code, details[:200])
        assert len(details) <= MAX_MESSAGE_CHARS and "x" * 1000 not in details, (method, len(details))
        assert count(service, method) == before + 1, method  # one call reached the server: no retry

    # 100 rejected events with 350 KB keys: the summary quotes each key cut, not whole.
    events = [
        fb.FeedbackEvent(idempotency_key=f"{i}-" + "k" * 350_000, accept=fb.LabelAccept(event_id="e"))
        for i in range(100)
    ]
    async with svc.client("annotator") as c:
        summary = await c.submit_stream(events, timeout_s=60)
    assert summary.received == 100 and summary.rejected == 100 and len(summary.rejections) == 100
    assert summary.ByteSize() < 200_000


# ---- idempotency conflicts, the log's file mode, the decisions queue gauge ---------------------------


async def test_reused_key_with_another_body_is_acknowledged_as_a_conflict(svc: Running) -> None:
    def pref(chosen: str) -> fb.FeedbackEvent:
        return fb.FeedbackEvent(
            idempotency_key="k-reused", preference=fb.Preference(prompt="p", chosen=chosen, rejected="b")
        )

    async with svc.client("annotator") as c:
        first = (await c.submit([pref("a")])).results[0]
        same = (await c.submit([pref("a")])).results[0]
        other = (await c.submit([pref("c")])).results[0]
        in_batch = (await c.submit([pref("a"), pref("d")])).results
    assert first.accepted and not first.duplicate
    assert same.accepted and same.duplicate and same.code == "" and same.seq == first.seq
    assert other.accepted and other.duplicate and other.code == "ALREADY_EXISTS" and other.seq == first.seq
    assert "different event" in other.reason
    assert in_batch[1].code == "ALREADY_EXISTS" and in_batch[0].code == ""
    stats = svc.app.feedback_log.log.stats()
    assert stats.feedback == 1  # stored once


async def test_log_file_private_and_decisions_gauge_drains(svc: Running) -> None:
    async with svc.client() as c:
        await c.annotate(["one", "two", "three"])
    gauge = {"queue": "decisions"}
    wait_until(lambda: _sample("loopserve_queue_depth", gauge) == 0.0, 10, "the decisions queue to drain")
    log_file = svc.app.cfg.data_dir / "feedback.sqlite3"
    for f in (log_file, Path(f"{log_file}-wal"), Path(f"{log_file}-shm")):
        if f.exists():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert log_file.exists()
