"""Exploration for served labels, with honest propensities.

- Every rule's choice distribution sums to one, matches its formula, and the labels drawn follow it.
- `--explore` reaches the policy process the way `loopserve up` hands it over (config -> flags -> the
  child's parser), and there it takes effect: with epsilon-greedy at epsilon 1 both labels are served,
  each with propensity 1/2, an explored label is flagged needs_review, and the feedback log holds the
  propensity served; a reject of an explored label becomes bandit feedback with that propensity.
- Off by default: the argmax is served with propensity 1.
"""

from __future__ import annotations

import random
import uuid
from pathlib import Path
from typing import Any

import pytest

from loopserve.cli import command as cli
from loopserve.cli.up import policy_config
from loopserve.config import PolicyConfig, to_argv
from loopserve.feedback.v1 import feedback_pb2 as fb
from loopserve.feedback_log import open_feedback_log
from policy_service.exploration import ExplorationRule, Explorer, choice_probs, draw
from tests.support.policy_harness import start_policy
from trainer.consumer import LabelSpace, TrainerState, ingest

PROBS = [[0.7, 0.2, 0.1], [0.34, 0.33, 0.33], [0.98, 0.01, 0.01], [0.05, 0.05, 0.9]]
RULES = [
    ExplorationRule("off"),
    ExplorationRule("epsilon-greedy", epsilon=0.2),
    ExplorationRule("softmax", temperature=0.5),
    ExplorationRule("softmax", temperature=3.0),
    ExplorationRule("ucb", ucb_c=1.0),
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.kind}")
def test_choice_probabilities_sum_to_one_and_draws_follow_them(rule: ExplorationRule) -> None:
    rng = random.Random(7)
    for p in PROBS:
        pi = choice_probs(rule, p, [3, 0, 1])
        assert sum(pi) == pytest.approx(1.0) and all(x >= 0 for x in pi)
        n = 20_000
        counts = [0] * len(pi)
        for _ in range(n):
            counts[draw(pi, rng)] += 1
        for j, x in enumerate(pi):  # within 5 standard errors of a binomial share
            assert abs(counts[j] / n - x) <= 5 * (x * (1 - x) / n) ** 0.5 + 1e-9


def test_rules_follow_their_formulas() -> None:
    p = [0.6, 0.3, 0.1]
    assert choice_probs(ExplorationRule("off"), p) == [1.0, 0.0, 0.0]
    assert choice_probs(ExplorationRule("epsilon-greedy", epsilon=0.3), p) == pytest.approx([0.8, 0.1, 0.1])
    assert choice_probs(ExplorationRule("softmax", temperature=1.0), p) == pytest.approx(p)  # the model's own
    sharp = choice_probs(ExplorationRule("softmax", temperature=0.5), p)  # p^2 / sum p^2
    assert sharp == pytest.approx([x * x / 0.46 for x in p])
    # UCB: a label never served gets the bonus that lifts it past the model's favourite.
    assert choice_probs(ExplorationRule("ucb", ucb_c=1.0), p, [50, 50, 0]) == [0.0, 0.0, 1.0]
    ucb = Explorer(ExplorationRule("ucb", ucb_c=1.0))
    served = [ucb.choose(["a", "b", "c"], p) for _ in range(30)]
    assert {j for j, _ in served} == {0, 1, 2} and all(prop == 1.0 for _, prop in served)
    with pytest.raises(ValueError, match="exploration rule"):
        ExplorationRule("thompson")
    with pytest.raises(ValueError, match="temperature"):
        ExplorationRule("softmax", temperature=0.0)


def _policy_config_as_up_hands_it(argv: list[str], data_dir: Path) -> PolicyConfig:
    """`loopserve up ARGV` -> the policy config `up` builds -> the flags it starts the policy with ->
    what the policy process's own parser reads back."""
    _, up = cli.parse_command(["up", *argv], environ={})
    _, cfg = cli.parse_command(["policy", *to_argv(policy_config(up))], environ={})
    assert cfg.explore == up.explore
    cfg.data_dir, cfg.port, cfg.metrics_port, cfg.watch_interval_s = data_dir, 0, -1, 0.2
    return cfg


async def test_explore_flag_takes_effect_in_the_policy_process_and_logs_true_propensities(
    tiny_data_dir: Path,
) -> None:
    cfg = _policy_config_as_up_hands_it(["--explore", "epsilon-greedy", "--explore-epsilon", "1.0"], tiny_data_dir)
    assert (cfg.explore, cfg.explore_epsilon) == ("epsilon-greedy", 1.0)
    svc = await start_policy(cfg)
    try:
        async with svc.client() as c:
            r = await c.annotate([(f"i{k}", f"review number {k}: fine tea") for k in range(60)])
        served = [a.labels[0] for a in r.annotations]
        assert {lb.label for lb in served} == {"great", "other"}  # epsilon 1: uniform over both labels
        for a in r.annotations:
            best = max(a.labels, key=lambda lb: lb.score)
            if a.labels[0].label != best.label:
                assert a.needs_review  # an explored label is never auto-labelled
        explored = next(a for a in r.annotations if a.labels[0].score < a.labels[1].score)
        async with svc.client("annotator") as c:
            ack = await c.submit(
                [
                    fb.FeedbackEvent(
                        idempotency_key=uuid.uuid4().hex,
                        annotator_id="ann-1",
                        reject=fb.LabelReject(event_id=explored.event_id),
                    )
                ]
            )
        assert ack.results[0].accepted
    finally:
        await svc.app.stop(1)
    log = open_feedback_log(cfg.feedback_log_url)
    try:
        decisions = log.get_decisions([a.event_id for a in r.annotations])
        assert len(decisions) == 60
        for a in r.annotations:
            d = decisions[a.event_id]
            assert d.propensity == pytest.approx(0.5) and d.propensity_kind == "prob"
            assert d.top_label == a.labels[0].label  # the log names the label served, not the argmax
        state = TrainerState()
        ingest(state, log.read(), LabelSpace("sentiment", ("great", "other")))
    finally:
        log.close()
    # The off-policy bandit update on rejects reads the logged propensity (0.5), not the score (< 0.5).
    assert [(b.event_id, b.label, b.propensity) for b in state.bandit] == [
        (explored.event_id, explored.labels[0].label, pytest.approx(0.5))
    ]


async def test_exploration_is_off_by_default_and_the_argmax_logs_propensity_one(tiny_data_dir: Path) -> None:
    cfg = _policy_config_as_up_hands_it([], tiny_data_dir)
    assert cfg.explore == "off"
    svc = await start_policy(cfg)
    try:
        async with svc.client() as c:
            r = await c.annotate([(f"i{k}", f"review {k}") for k in range(10)])
    finally:
        await svc.app.stop(1)
    assert all(a.labels[0].score == max(lb.score for lb in a.labels) for a in r.annotations)
    log = open_feedback_log(cfg.feedback_log_url)
    try:
        decisions = log.get_decisions([a.event_id for a in r.annotations])
    finally:
        log.close()
    assert sorted(d.propensity for d in decisions.values()) == [1.0] * 10


def test_the_annotation_demo_hands_its_exploration_flags_to_the_policy_process() -> None:
    from loopserve.cli.demo.annotation import _policy_flags

    def config(argv: list[str]) -> Any:
        return cli.parse_command(argv, environ={})[1]

    opts = cli.demo_options(config(["demo", "--explore", "epsilon-greedy", "--explore-epsilon", "0.2"]))
    cfg = config(["policy", *_policy_flags(opts)])
    assert (cfg.explore, cfg.explore_epsilon) == ("epsilon-greedy", 0.2)
    default = cli.demo_options(config(["demo"]))
    assert config(["policy", *_policy_flags(default)]).explore == "off"
