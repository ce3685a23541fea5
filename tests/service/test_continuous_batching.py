"""Continuous batching for generation: requests join and leave the running decode batch token by token.

- Rows that join a running batch at different steps decode exactly as they would alone (same tokens,
  same sampling log-probabilities: per-row seeds and propensities survive the shared batch).
- Through the real service: a short request sent while long ones decode is answered before any of
  them ends; with `--gen-batching static` it waits for them (the flag takes effect).
- A swap while long rows decode: they end on the version they started on, while a new request is
  answered by the new version in the meantime (each version its own running batch).
No timed asserts: every check is about order, not seconds.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from loopserve.client import AsyncClient
from loopserve.models import generator
from loopserve.models.store import ModelStore
from loopserve.serving.batcher import DynamicBatcher
from loopserve.serving.continuous_batcher import ContinuousBatcher
from policy_service import sampling
from policy_service.continuous import DecodeBatch
from policy_service.types import SamplingParams
from tests.support import tiny_models
from tests.support.policy_harness import policy_config, start_policy
from tests.support.waiting import wait_until

LONG = 400  # tokens: long enough that a short request sent after the first token ends well before


def _requests(tok: object) -> list[sampling.SequenceRequest]:
    prompts = ["Tell me a story.", "Hi", "What is the capital of France? One word, please.", "Tea or coffee?"]
    out = []
    for i, text in enumerate(prompts):
        ids = tok(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        params = SamplingParams(
            max_new_tokens=6 + 5 * i, temperature=0.0 if i == 0 else 0.9, top_p=0.95 if i == 2 else 1.0, top_k=50 * i
        )
        out.append(sampling.SequenceRequest(list(ids), params, row_seed=11 + i))
    return out


def test_one_batched_draw_gives_each_row_its_own_sampling_distribution() -> None:
    """The batch's log-probabilities are `sampling_logprobs` row by row (the propensity a logged
    completion carries), each row with its own temperature, top-k and top-p; a seed reproduces a row
    whatever shares its batch; and the draws follow the distribution (a chi-square check)."""
    torch.manual_seed(0)
    V = 50
    logits = torch.randn(5, V) * 3
    params = [
        SamplingParams(max_new_tokens=1, temperature=0.0),
        SamplingParams(max_new_tokens=1, temperature=0.7),
        SamplingParams(max_new_tokens=1, temperature=1.3, top_k=5),
        SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.6),
        SamplingParams(max_new_tokens=1, temperature=2.0, top_k=20, top_p=0.9),
    ]
    gens = [torch.Generator().manual_seed(i) for i in range(5)]
    tokens, logps = sampling.sample_rows(logits, params, gens)
    assert tokens[0] == int(logits[0].argmax())
    assert logps[0] == pytest.approx(float(torch.log_softmax(logits[0], -1)[tokens[0]]), abs=1e-6)
    for i in range(1, 5):
        expected = sampling.sampling_logprobs(logits[i], params[i])
        assert logps[i] == pytest.approx(float(expected[tokens[i]]), abs=1e-9)
        assert torch.isfinite(expected[tokens[i]])  # never a token the filters removed
    # The same seed, alone or beside other rows: the same token.
    alone = sampling.sample_rows(logits[3:4], params[3:4], [torch.Generator().manual_seed(3)])
    assert alone[0][0] == tokens[3]
    # 4,000 draws of row 4 against its distribution: a chi-square well under the 0.1% critical value.
    gen = torch.Generator().manual_seed(123)
    draws = [sampling.sample_rows(logits[4:5], params[4:5], [gen])[0][0] for _ in range(4000)]
    probs = sampling.sampling_logprobs(logits[4], params[4]).exp()
    support = [t for t in range(V) if probs[t] > 0]
    counts = torch.bincount(torch.tensor(draws), minlength=V).double()
    assert set(draws) <= set(support)
    expected_counts = probs[support] * 4000
    chi2 = float((((counts[support] - expected_counts) ** 2) / expected_counts).sum())
    assert chi2 < 2.0 * len(support) + 30, (chi2, len(support))


def test_a_sequence_that_ends_on_its_end_token_counts_that_token_in_its_propensity(tmp_path: Path) -> None:
    """The logged propensity is the probability of the finished sequence: the end token's too."""
    tok = generator.load_tokenizer(tiny_models.tiny_generator(tmp_path / "gen"))
    eos = int(tok.eos_token_id)
    row = sampling.Row(sampling.SequenceRequest([1, 2], SamplingParams(max_new_tokens=8, temperature=0.0)), tok)
    logits = torch.zeros(1, len(tok))
    logits[0, 7] = 3.0
    first = float(torch.log_softmax(logits[0], -1)[7])
    sampling.advance([row], logits, {eos}, torch.zeros(1, dtype=torch.long))  # token 7
    logits[0, eos] = 5.0
    end = float(torch.log_softmax(logits[0], -1)[eos])
    sampling.advance([row], logits, {eos}, torch.zeros(1, dtype=torch.long))  # the end token
    assert row.result.finish_reason == "stop" and row.result.token_ids == [7]
    assert row.result.sequence_logprob == pytest.approx(first + end, abs=1e-5)
    assert len(row.result.token_logprobs) == 1  # one per token of the text, as clients see them


def test_rows_that_join_a_running_batch_decode_as_they_would_alone(tmp_path: Path) -> None:
    folder = tiny_models.tiny_generator(tmp_path / "gen", seed=3)
    model, tok = generator.load(folder), generator.load_tokenizer(folder)
    alone = [sampling.generate(model, tok, [r])[0] for r in _requests(tok)]

    batch = DecodeBatch(model, tok)
    reqs = _requests(tok)
    finished: dict[str, sampling.SequenceResult] = {}
    widths: list[int] = []  # positions projected onto the vocabulary, per forward: the last one only
    model.register_forward_hook(lambda _m, _a, out: widths.append(out.logits.shape[1]))

    def collect() -> None:
        for token, results in batch.pop_finished():
            finished[str(token)] = results[0]

    batch.admit([("r0", [reqs[0]])])
    batch.step()
    batch.step()
    batch.admit([("r1", [reqs[1]]), ("r2", [reqs[2]])])  # two join together, with different prompt lengths
    collect()
    batch.step()
    batch.admit([("r3", [reqs[3]])])
    while batch.rows:
        batch.step()
        collect()
    collect()

    assert sorted(finished) == ["r0", "r1", "r2", "r3"]
    assert widths and set(widths) == {1}, widths
    for i, ref in enumerate(alone):
        got = finished[f"r{i}"]
        assert got.token_ids == ref.token_ids, i
        assert got.finish_reason == ref.finish_reason
        assert got.token_logprobs == pytest.approx(ref.token_logprobs, abs=1e-4)
    assert batch.rows == 0


def test_rows_of_one_prompt_share_its_prefill_and_decode_as_they_would_alone(tmp_path: Path) -> None:
    """A request's n completions (rows with one prompt) prefill that prompt once, in the static and the
    continuous batch, and each row draws, with its own seed, the tokens and log-probs it draws alone."""
    folder = tiny_models.tiny_generator(tmp_path / "gen", seed=3)
    model, tok = generator.load(folder), generator.load_tokenizer(folder)
    story, other = _requests(tok)[2], _requests(tok)[3]
    reqs = [sampling.SequenceRequest(story.prompt_ids, story.params, row_seed=40 + i) for i in range(3)] + [other]
    alone = [sampling.generate(model, tok, [r])[0] for r in reqs]
    assert len({tuple(r.token_ids) for r in alone[:3]}) > 1  # the seeds draw apart: nothing is copied

    shapes: list[tuple[int, ...]] = []
    hook = model.register_forward_hook(
        lambda _m, args, kwargs, _out: shapes.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    static = sampling.generate(model, tok, reqs)
    assert shapes[0] == (2, len(story.prompt_ids)), shapes  # two distinct prompts, the longer one's width
    shapes.clear()
    batch = DecodeBatch(model, tok)
    batch.admit([("n3", reqs[:3]), ("other", reqs[3:])])
    while batch.rows:
        batch.step()
    continuous = dict(batch.pop_finished())
    hook.remove()
    assert shapes[0] == (2, len(story.prompt_ids)), shapes
    assert shapes[1] == (4, 1), shapes  # then every row decodes its own token
    for got in (static, continuous["n3"] + continuous["other"]):
        for g, ref in zip(got, alone, strict=True):
            assert g.token_ids == ref.token_ids
            assert g.finish_reason == ref.finish_reason
            assert g.token_logprobs == pytest.approx(ref.token_logprobs, abs=1e-4)


async def _long_stream(c: AsyncClient, seed: int, first_token: asyncio.Event, order: list[str]) -> str:
    version = ""
    async for msg in c.generate_stream("Tell me a very long story.", max_new_tokens=LONG, seed=seed, timeout_s=120):
        version = msg.model_version
        first_token.set()
        if msg.done:
            assert msg.finish_reason == "length", msg.finish_reason
    order.append(f"long{seed}")
    return version


async def _long_streams_decoding(c: AsyncClient, n: int, order: list[str]) -> list[asyncio.Task[str]]:
    """`n` long streams, returned once every one of them has its first token (all are decoding)."""
    started = [asyncio.Event() for _ in range(n)]
    longs = [asyncio.create_task(_long_stream(c, s, started[s], order)) for s in range(n)]
    for e in started:
        await asyncio.wait_for(e.wait(), 60)
    return longs


@pytest.mark.parametrize("batching", ["continuous", "static"])
async def test_a_short_request_is_answered_while_long_ones_decode(tiny_data_dir: Path, batching: str) -> None:
    svc = await start_policy(policy_config(tiny_data_dir, max_new_tokens_cap=LONG, gen_batching=batching))
    try:
        batcher = svc.app.frontend.generate_batcher
        assert isinstance(batcher, ContinuousBatcher if batching == "continuous" else DynamicBatcher)
        order: list[str] = []
        async with svc.client() as c:
            longs = await _long_streams_decoding(c, 3, order)
            short = await c.generate("Hi", max_new_tokens=2, temperature=0.0, timeout_s=120)
            order.append("short")
            await asyncio.gather(*longs)
        assert short.completions[0].num_tokens <= 2
        if batching == "continuous":
            assert order[0] == "short", order  # joined the running batch and left it first
        else:
            assert order[-1] == "short", order  # waited for the batch in flight
    finally:
        await svc.app.stop(1)


async def test_rows_of_two_versions_decode_side_by_side_across_a_swap(tiny_data_dir: Path, tmp_path: Path) -> None:
    svc = await start_policy(policy_config(tiny_data_dir, max_new_tokens_cap=LONG, watch_interval_s=0.05))
    try:
        order: list[str] = []
        async with svc.client() as c:
            longs = await _long_streams_decoding(c, 2, order)
            store = ModelStore(tiny_data_dir / "store")
            new = store.publish_version("generator", tiny_models.tiny_generator(tmp_path / "g1", seed=1)).version
            slot = svc.app.runtime.generator
            assert slot is not None
            await asyncio.to_thread(wait_until, lambda: slot.current.version == new, 60, "the swap to the new version")
            short = await c.generate("Hi", max_new_tokens=2, temperature=0.0, timeout_s=120)
            order.append("short")
            versions = await asyncio.gather(*longs)
        assert short.model_version == new
        assert versions == ["v0", "v0"]  # pinned: the rows that started on v0 ended on it
        assert order[0] == "short", order
    finally:
        await svc.app.stop(1)


def test_a_prefill_that_fails_fails_its_request_alone(tmp_path: Path) -> None:
    """A job whose prompt cannot be embedded (an id outside the vocabulary) fails at admission; the
    rows already decoding go on to their end."""
    folder = tiny_models.tiny_generator(tmp_path / "gen", seed=3)
    model, tok = generator.load(folder), generator.load_tokenizer(folder)
    batch = DecodeBatch(model, tok)
    good = _requests(tok)[3]
    batch.admit([("good", [good])])
    bad = sampling.SequenceRequest([len(tok) + 10_000], SamplingParams(max_new_tokens=3), row_seed=1)
    with pytest.raises((IndexError, RuntimeError)):
        with torch.inference_mode():
            batch.admit([("bad", [bad])])
    while batch.rows:
        batch.step()
    (token, results), *_ = batch.pop_finished()
    assert token == "good" and results[0].finish_reason in {"length", "stop"} and results[0].error is None
