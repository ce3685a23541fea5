"""RewardRuntime and the reward domain types, with no server (runtime tier).

A tiny random BERT (hidden 32, tests/support/tiny_models.py) in the reward folder format, with the real MiniLM
tokenizer, in a temporary ModelStore. What a user would notice: one finite reward per pair in request
order, the same reward whatever else shares the batch, the response kept whole when a pair is over
the window, Compare agreeing with Score, versions that are not reward models or give NaN refused
while the old one keeps serving, and bad requests refused with messages that say what to fix.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from loopserve.errors import InvalidArgument, VerificationError
from loopserve.models import encoder_heads
from loopserve.models.provision import encoder_dir
from loopserve.models.reward_format import encode_pairs
from loopserve.models.store import ModelStore
from loopserve.reward.v1 import reward_pb2 as pb
from reward_service.runtime import RewardRuntime, RuntimeOptions
from reward_service.types import CompareCall, Limits, ScoreCall, preference_probability
from tests.support import tiny_models

MAX_TOKENS = 32
LONG_PROMPT = " ".join(f"word{i}" for i in range(200))

PAIRS = [
    ("What is the capital of France?", "Paris."),
    ("Summarise the review.", "The coffee was stale and the bag arrived torn, so I would not buy it again."),
    ("Hi", "Hello! How can I help you today?"),
    (LONG_PROMPT, "A short answer."),
    ("Write a poem", "Roses are red"),
]


# ---- tiny reward versions ---------------------------------------------------------------------------


@torch.no_grad()
def tiny_reward_version(dest: Path, seed: int = 0, bias: float = 0.0) -> Path:
    """tests.support.tiny_models' tiny reward model with a head whose scores differ clearly from pair to pair;
    `bias` shifts every score by that much (same seed, same encoder)."""
    tiny_models.tiny_reward(dest, seed)
    model = encoder_heads.load(dest)
    gen = torch.Generator().manual_seed(seed)
    model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=gen) * 3.0)
    model.head.bias.fill_(bias)
    encoder_heads.save(model, encoder_heads.load_tokenizer(dest), dest)
    return dest


# ---- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerBase:
    return encoder_heads.load_tokenizer(encoder_dir())


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_reward_version(tmp_path_factory.mktemp("tiny-reward"))


@pytest.fixture(scope="session")
def runtime(tmp_path_factory: pytest.TempPathFactory, tiny_reward_dir: Path) -> RewardRuntime:
    store = ModelStore(tmp_path_factory.mktemp("store"))
    store.publish_version("reward", tiny_reward_dir)
    rt = RewardRuntime(
        store,
        RuntimeOptions(device=torch.device("cpu"), dtype=torch.float32, max_input_tokens=MAX_TOKENS, micro_batch=2),
    )
    assert not rt.healthy()
    rt.load()
    assert rt.healthy()
    return rt


@pytest.fixture
def fresh_runtime(tmp_path: Path, tiny_reward_dir: Path) -> RewardRuntime:
    """A runtime over its own store, for tests that publish versions."""
    store = ModelStore(tmp_path / "store")
    store.publish_version("reward", tiny_reward_dir)
    rt = RewardRuntime(
        store, RuntimeOptions(device=torch.device("cpu"), dtype=torch.float32, max_input_tokens=MAX_TOKENS)
    )
    rt.load()
    return rt


def score_all(rt: RewardRuntime, pairs) -> list[float]:
    return rt.score_batch(rt.reward.current, [ScoreCall(tuple(pairs))])[0]


# ---- scoring ---------------------------------------------------------------------------------------


def test_one_finite_reward_per_pair_in_request_order(runtime):
    scores = score_all(runtime, PAIRS)
    assert len(scores) == len(PAIRS)
    assert all(math.isfinite(s) for s in scores)
    assert len({round(s, 4) for s in scores}) == len(PAIRS), "distinct pairs should get distinct rewards"
    # Reversed request, reversed answer: rewards follow their pairs, not their positions.
    assert score_all(runtime, PAIRS[::-1]) == pytest.approx(scores[::-1], abs=1e-5)


def test_reward_does_not_depend_on_what_shares_the_batch(runtime):
    # micro_batch=2 and pairs of very different lengths: sorting and padding must not leak.
    together = score_all(runtime, PAIRS)
    alone = [score_all(runtime, [p])[0] for p in PAIRS]
    assert together == pytest.approx(alone, abs=1e-5)


def test_calls_in_one_batch_get_their_own_rewards(runtime):
    handle = runtime.reward.current
    calls = [ScoreCall(tuple(PAIRS[:2])), CompareCall(*PAIRS[2], "Goodbye."), ScoreCall((PAIRS[4],))]
    results = runtime.score_batch(handle, calls)
    assert [len(r) for r in results] == [2, 2, 1]
    assert results[0] == pytest.approx(score_all(runtime, PAIRS[:2]), abs=1e-5)
    assert results[1] == pytest.approx(score_all(runtime, [PAIRS[2], (PAIRS[2][0], "Goodbye.")]), abs=1e-5)
    assert results[2] == pytest.approx(score_all(runtime, [PAIRS[4]]), abs=1e-5)


def test_an_old_handle_keeps_scoring_on_its_version_after_a_swap(fresh_runtime: RewardRuntime, tmp_path: Path) -> None:
    old = fresh_runtime.reward.current
    before = fresh_runtime.score_batch(old, [ScoreCall(tuple(PAIRS))])[0]
    fresh_runtime.store.publish_version("reward", tiny_reward_version(tmp_path / "v1", bias=5.0))
    assert fresh_runtime.reward.poll_once()
    new = fresh_runtime.reward.current
    assert (old.version, new.version) == ("v0", "v1")
    assert fresh_runtime.score_batch(old, [ScoreCall(tuple(PAIRS))])[0] == pytest.approx(before, abs=1e-5)
    assert fresh_runtime.score_batch(new, [ScoreCall(tuple(PAIRS))])[0] == pytest.approx(
        [s + 5.0 for s in before], abs=1e-4
    )


# ---- truncation ------------------------------------------------------------------------------------


def test_pairs_within_the_window_are_encoded_untouched(tokenizer):
    enc = encode_pairs(tokenizer, PAIRS[:3], MAX_TOKENS)
    for (prompt, response), ids in zip(PAIRS[:3], enc["input_ids"], strict=True):
        assert ids == tokenizer(prompt, response)["input_ids"]


def test_a_long_prompt_is_cut_and_the_response_kept_whole(tokenizer):
    # 20 tokens: 'longest_first' would share the 29-token budget and cut the response too.
    response = "The answer is forty two, because six times seven is forty two and the guide says so too."
    ids = encode_pairs(tokenizer, [(LONG_PROMPT, response)], MAX_TOKENS)["input_ids"][0]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert len(ids) == MAX_TOKENS
    assert ids[-len(response_ids) - 1 : -1] == response_ids  # [CLS] prompt... [SEP] response [SEP]


def test_a_response_over_the_window_falls_back_to_longest_first(tokenizer):
    long_response = " ".join(f"token{i}" for i in range(100))
    enc = encode_pairs(tokenizer, [("Short prompt?", long_response), (LONG_PROMPT, "ok")], MAX_TOKENS)
    ids, types = enc["input_ids"][0], enc["token_type_ids"][0]
    assert len(ids) == MAX_TOKENS
    assert 0 in types[1:] and 1 in types, "both the prompt and the response keep tokens"
    assert len(enc["input_ids"][1]) == MAX_TOKENS  # the other strategy in the same call


def test_text_past_the_window_does_not_change_the_reward(runtime):
    # Only the prompt's tail differs, and it lies past the window: same reward. The response differs:
    # different reward (the response is what truncation protects).
    a = runtime.rewards(runtime.reward.current.model, [(LONG_PROMPT + " tail one", "Yes.")])[0]
    b = runtime.rewards(runtime.reward.current.model, [(LONG_PROMPT + " another tail", "Yes.")])[0]
    c = runtime.rewards(runtime.reward.current.model, [(LONG_PROMPT, "No, never, not at all.")])[0]
    assert a == pytest.approx(b, abs=1e-6)
    assert abs(a - c) > 1e-3


# ---- compare ---------------------------------------------------------------------------------------


def test_compare_is_bradley_terry_over_the_scores(runtime):
    handle = runtime.reward.current
    prompt, a, b = "Is this coffee good?", "Yes, rich and smooth.", "It arrived stale."
    forward, backward, same = runtime.compare_batch(
        handle, [CompareCall(prompt, a, b), CompareCall(prompt, b, a), CompareCall(prompt, a, a)]
    )
    sa, sb = score_all(runtime, [(prompt, a), (prompt, b)])
    assert forward.p_a_preferred == pytest.approx(1 / (1 + math.exp(-(sa - sb))), abs=1e-5)
    assert (forward.score_a, forward.score_b) == pytest.approx((sa, sb), abs=1e-5)
    assert forward.p_a_preferred + backward.p_a_preferred == pytest.approx(1.0, abs=1e-6)
    assert same.p_a_preferred == pytest.approx(0.5, abs=1e-6)
    assert forward.model_version == "v0"


def test_preference_probability_does_not_overflow():
    assert preference_probability(1000.0, -1000.0) == 1.0
    assert preference_probability(-1000.0, 1000.0) == 0.0
    assert preference_probability(0.3, 0.3) == 0.5


# ---- loading: what is refused keeps the old version serving ----------------------------------------


def test_a_version_that_is_not_a_reward_model_is_refused(fresh_runtime: RewardRuntime, tmp_path: Path) -> None:
    fresh_runtime.store.publish_version("reward", tiny_models.tiny_annotator(tmp_path / "ann"))
    with pytest.raises(VerificationError, match="not a reward model"):
        fresh_runtime.reward.load_version("v1")
    assert not fresh_runtime.reward.poll_once()  # the watch does not retry a refused version
    assert fresh_runtime.reward.current.version == "v0"
    assert all(math.isfinite(s) for s in score_all(fresh_runtime, PAIRS))


def test_a_version_with_non_finite_rewards_is_refused(fresh_runtime: RewardRuntime, tmp_path: Path) -> None:
    fresh_runtime.store.publish_version("reward", tiny_reward_version(tmp_path / "nan", bias=math.nan))
    assert not fresh_runtime.reward.poll_once()
    assert fresh_runtime.reward.current.version == "v0"
    with pytest.raises(VerificationError, match="holds NaN or infinite values"):  # refused as it loads
        fresh_runtime.reward.load_version("v1")


# ---- request validation ----------------------------------------------------------------------------

LIMITS = Limits(max_pairs_per_request=4, max_text_chars=100)


def score_request(*pairs: tuple[str, str]) -> pb.ScoreRequest:
    return pb.ScoreRequest(pairs=[pb.Pair(prompt=p, response=r) for p, r in pairs])


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (score_request(), "pairs is empty"),
        (score_request(*[("p", "r")] * 5), "5 pairs in one request; the limit is 4"),
        (score_request(("p", "r"), ("", "r")), "pairs[1].prompt is empty"),
        (score_request(("p", "   ")), "pairs[0].response is empty"),
        (score_request(("p", "x" * 101)), "pairs[0].response has 101 characters; the limit is 100"),
    ],
)
def test_bad_score_requests_are_refused_with_a_message_that_says_what_to_fix(request_, message):
    with pytest.raises(InvalidArgument) as err:
        ScoreCall.from_pb(request_, LIMITS)
    assert message in err.value.message


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.CompareRequest(prompt="", a="x", b="y"), "prompt is empty"),
        (pb.CompareRequest(prompt="p", a="", b="y"), "a (the first response) is empty"),
        (pb.CompareRequest(prompt="p", a="x", b="y" * 101), "b (the second response) has 101 characters"),
    ],
)
def test_bad_compare_requests_are_refused(request_, message):
    with pytest.raises(InvalidArgument) as err:
        CompareCall.from_pb(request_, LIMITS)
    assert message in err.value.message


def test_good_requests_round_trip():
    call = ScoreCall.from_pb(score_request(("p1", "r1"), ("p2", "r2")), LIMITS)
    assert call.pairs == (("p1", "r1"), ("p2", "r2"))
    assert CompareCall.from_pb(pb.CompareRequest(prompt="p", a="x", b="y"), LIMITS).pairs == (
        ("p", "x"),
        ("p", "y"),
    )
