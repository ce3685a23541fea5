"""Encoder forwards cut by padded tokens: every item once, shortest first, within the budget, and the same
answers however a batch is cut (both runtimes), with the budget read from the services' flag."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from loopserve.cli.up import stack_configs
from loopserve.config import PolicyConfig, RewardConfig
from loopserve.models.micro_batches import CPU_TOKEN_BUDGET, MAX_ITEMS, NO_TOKEN_LIMIT, micro_batches, token_budget
from loopserve.models.store import ModelStore
from policy_service import runtime as policy_runtime
from reward_service import runtime as reward_runtime
from tests.unit.test_config_flags import config


@pytest.mark.parametrize("budget", [NO_TOKEN_LIMIT, 0, 1, 64, 512])
def test_every_item_once_shortest_first_within_the_budget(budget: int) -> None:
    rng = random.Random(max(budget, 0))
    lengths = [rng.randint(3, 256) for _ in range(200)]
    groups = micro_batches(lengths, budget)
    flat = [i for g in groups for i in g]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)  # shortest first
    for g in groups:
        assert len(g) <= MAX_ITEMS
        padded = len(g) * max(lengths[i] for i in g)
        assert budget <= 0 or padded <= budget or len(g) == 1  # a longer text than the budget goes alone
    if budget <= 0:  # no token limit: forwards of MAX_ITEMS, as before the budget existed
        assert [len(g) for g in groups] == [MAX_ITEMS] * 6 + [8]
    assert micro_batches([], budget) == []


def test_the_budget_defaults_by_device_and_a_set_one_wins() -> None:
    assert token_budget(0, "cpu") == CPU_TOKEN_BUDGET and token_budget(0, "cuda") == NO_TOKEN_LIMIT
    assert token_budget(300, "cpu") == 300 and token_budget(300, "cuda") == 300
    assert token_budget(NO_TOKEN_LIMIT, "cpu") == NO_TOKEN_LIMIT == token_budget(NO_TOKEN_LIMIT, "cuda")
    for device in ("cpu", "cuda"):  # resolving is idempotent (a runtime's options may be resolved again)
        for configured in (0, 96, NO_TOKEN_LIMIT):
            once = token_budget(configured, device)
            assert token_budget(once, device) == once


def test_the_flag_reaches_both_runtimes_and_up_hands_it_to_both_services(tmp_path: Path) -> None:
    policy = config(["policy", "--encoder-token-budget", "96"])
    reward = config(["reward", "--encoder-token-budget", "96"])
    assert isinstance(policy, PolicyConfig) and isinstance(reward, RewardConfig)
    assert policy_runtime.RuntimeOptions.of(policy).token_budget == 96
    assert reward_runtime.RuntimeOptions.of(reward).token_budget == 96
    assert policy_runtime.RuntimeOptions.of(replace(policy, encoder_token_budget=0)).token_budget == CPU_TOKEN_BUDGET
    # the device's rule is the runtime's own default, not only the config path's
    assert policy_runtime.RuntimeOptions(torch.device("cpu"), torch.float32).token_budget == CPU_TOKEN_BUDGET
    assert reward_runtime.RuntimeOptions(torch.device("cpu"), torch.float32).token_budget == CPU_TOKEN_BUDGET
    # on a GPU none (no CUDA needed to build the options)
    assert policy_runtime.RuntimeOptions(torch.device("cuda"), torch.float32).token_budget == NO_TOKEN_LIMIT
    assert reward_runtime.RuntimeOptions(torch.device("cuda"), torch.float32).token_budget == NO_TOKEN_LIMIT
    served = stack_configs(config(["up", "--encoder-token-budget", "96"]))
    assert [c.encoder_token_budget for c in served] == [96, 96]


TEXTS = ["ok", "good tea " * 3, "word " * 40, "bitter", "a long review of coffee " * 8, "fine"]


def test_the_annotator_answers_the_same_however_a_batch_is_cut(tiny_data_dir: Path) -> None:
    answers = []
    for budget in (NO_TOKEN_LIMIT, 8, 64):  # one forward; one text a forward; a few
        opts = policy_runtime.RuntimeOptions(
            torch.device("cpu"), torch.float32, max_input_tokens=64, token_budget=budget
        )
        rt = policy_runtime.PolicyRuntime(ModelStore(tiny_data_dir / "store"), opts)
        rt.load()
        answers.append(torch.tensor(rt.label_probs(rt.annotator.current.model, TEXTS)))  # (N, L)
    for other in answers[1:]:
        assert torch.allclose(other, answers[0], atol=1e-5)


def test_the_reward_model_scores_the_same_however_a_batch_is_cut(tiny_data_dir: Path, tmp_path: Path) -> None:
    from tests.unit.test_reward_runtime import tiny_reward_version

    store = ModelStore(tmp_path / "store")
    store.publish_version("reward", tiny_reward_version(tmp_path / "v0"))
    pairs = [("How was it?", t) for t in TEXTS]
    scores = []
    for budget in (NO_TOKEN_LIMIT, 8, 64):
        opts = reward_runtime.RuntimeOptions(
            torch.device("cpu"), torch.float32, max_input_tokens=64, token_budget=budget
        )
        rt = reward_runtime.RewardRuntime(store, opts)
        rt.load()
        scores.append(rt.rewards(rt.reward.current.model, pairs))
    for other in scores[1:]:
        assert other == pytest.approx(scores[0], abs=1e-5)
