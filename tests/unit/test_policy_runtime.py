"""PolicyRuntime with tiny random models (no server): shapes of answers, sampling controls, checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loopserve.models.store import ModelStore
from policy_service.runtime import PolicyRuntime, RuntimeOptions
from policy_service.types import AnnotateCall, GenerateCall, SamplingParams, TokenDelta


@pytest.fixture
def runtime(tiny_data_dir: Path) -> PolicyRuntime:
    rt = PolicyRuntime(
        ModelStore(tiny_data_dir / "store"),
        RuntimeOptions(device=torch.device("cpu"), dtype=torch.float32, max_input_tokens=16, review_threshold=0.8),
    )
    rt.load()
    return rt


def _gen(rt: PolicyRuntime, prompt: str, n: int = 1, **params: object) -> list:
    call = GenerateCall(prompt, n, True, SamplingParams(**{"max_new_tokens": 8, **params}))  # type: ignore[arg-type]
    h = rt.generator.current
    ids = rt.prompt_ids(h, call)
    return rt.generate_batch(h, [(call, ids, rt.sequence_requests(call, ids))])[0]


def test_annotate_ranks_declared_labels_with_probabilities(runtime: PolicyRuntime) -> None:
    call = AnnotateCall("sentiment", ("a", "b"), ("good tea", "word " * 100), top_k=0)
    [anns] = runtime.annotate_batch(runtime.annotator.current, [call])
    assert [a.item_id for a in anns] == ["a", "b"]
    for a in anns:
        assert {lb.label for lb in a.labels} == {"great", "other"}
        scores = [lb.score for lb in a.labels]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)
        assert a.needs_review  # v0 is unchecked: every item goes to a person, whatever its score
    assert not anns[0].truncated and anns[1].truncated  # 100 words > 16 tokens
    assert len({a.event_id for a in anns}) == 2


def test_annotate_top_k_and_batches_of_many_calls(runtime: PolicyRuntime) -> None:
    calls = [AnnotateCall("sentiment", (str(i),), (f"text {i}",), top_k=1) for i in range(5)]
    out = runtime.annotate_batch(runtime.annotator.current, calls)
    assert [len(o) for o in out] == [1] * 5
    assert all(len(o[0].labels) == 1 for o in out)


def test_seeded_sampling_is_reproducible_and_rows_differ(runtime: PolicyRuntime) -> None:
    a = _gen(runtime, "hello", n=3, temperature=1.0, seed=7)
    b = _gen(runtime, "hello", n=3, temperature=1.0, seed=7)
    assert [c.text for c in a] == [c.text for c in b]
    assert len({tuple(c.text) for c in a}) > 1


def test_max_new_tokens_logprobs_and_greedy(runtime: PolicyRuntime) -> None:
    [c] = _gen(runtime, "hello", max_new_tokens=5, temperature=0.0, logprobs=True)
    assert c.num_tokens <= 5
    assert len(c.token_logprobs) == c.num_tokens
    assert c.sequence_logprob == pytest.approx(sum(c.token_logprobs), abs=1e-4)
    assert all(lp <= 0 for lp in c.token_logprobs)
    [again] = _gen(runtime, "hello", max_new_tokens=5, temperature=0.0)
    assert again.text == c.text


def test_stop_strings_cut_the_text(runtime: PolicyRuntime) -> None:
    [free] = _gen(runtime, "hello", max_new_tokens=24, temperature=1.0, seed=3)
    if len(free.text) < 4:
        pytest.skip("the random model ended at once")
    stop = free.text[2:4]
    [cut] = _gen(runtime, "hello", max_new_tokens=24, temperature=1.0, seed=3, stop=(stop,))
    assert stop not in cut.text
    assert free.text.startswith(cut.text)
    assert cut.finish_reason == "stop"


def test_streamed_deltas_add_up_to_the_completion(runtime: PolicyRuntime) -> None:
    deltas: list[TokenDelta] = []
    call = GenerateCall("hello", 1, True, SamplingParams(max_new_tokens=12, temperature=1.0, seed=5))
    h = runtime.generator.current
    ids = runtime.prompt_ids(h, call)
    seqs = runtime.sequence_requests(call, ids, on_token=deltas.append)
    [[c]] = runtime.generate_batch(h, [(call, ids, seqs)])
    assert deltas[-1].done and deltas[-1].num_tokens == c.num_tokens
    assert "".join(d.text for d in deltas) == c.text


def test_a_cancelled_row_stops_early(runtime: PolicyRuntime) -> None:
    call = GenerateCall("hello", 1, True, SamplingParams(max_new_tokens=64, temperature=1.0, seed=1))
    h = runtime.generator.current
    ids = runtime.prompt_ids(h, call)
    seqs = runtime.sequence_requests(call, ids, cancelled=lambda: True)
    [[c]] = runtime.generate_batch(h, [(call, ids, seqs)])
    assert c.finish_reason == "cancelled" and c.num_tokens == 0


def test_healthy_only_after_load(tiny_data_dir: Path) -> None:
    rt = PolicyRuntime(ModelStore(tiny_data_dir / "store"), RuntimeOptions(torch.device("cpu"), torch.float32))
    assert not rt.healthy()
    rt.load()
    assert rt.healthy()


def test_a_checked_version_flags_by_its_calibrated_confidence(runtime: PolicyRuntime, tiny_data_dir: Path) -> None:
    """Only a version the trainer's gate checked (manifest meta `checked`) may leave items to auto-label."""
    store = ModelStore(tiny_data_dir / "store")
    import shutil

    src = tiny_data_dir / "checked"
    shutil.copytree(store.path("annotator", "v0"), src, ignore=shutil.ignore_patterns("manifest.json"))
    store.publish_version("annotator", src, parent="v0", meta={"checked": True})
    runtime.annotator.load_latest()
    call = AnnotateCall("sentiment", ("a", "b", "c"), ("good tea", "bad tea", "tea"), top_k=0)
    [anns] = runtime.annotate_batch(runtime.annotator.current, [call])
    assert runtime.annotator.current.version == "v1"
    for a in anns:
        assert a.needs_review == (a.labels[0].score < 0.8)
