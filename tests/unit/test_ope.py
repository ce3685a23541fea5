"""Off-policy evaluation (trainer/ope.py, trainer/off_policy.py) and the off-policy gate.

- On synthetic logs with a known true value, IPS, SNIPS and DR land within their 95% intervals about
  95% of the time over 100 independent logs (one log alone misses with probability 5% by design, so
  the test counts coverage rather than checking one log), and a decent reward model narrows DR's.
- The gate refuses a candidate whose lower bound does not beat serving, only when asked to.
- In the trainer, over a real SQLite log of labels served with honest exploration propensities: a
  candidate that beats the serving version off-policy is published with its estimates in the round
  record and the manifest; the serving version valued as a candidate against the trained one (worse
  off-policy) is refused.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from loopserve.feedback_log import Decision, Feedback, open_feedback_log
from loopserve.models import encoder_heads
from loopserve.models.encoder_heads import AnnotatorModel
from loopserve.models.store import ModelStore
from tests.e2e.test_trainer_loop import LOG_LABEL_SETS, TASK, base_store, data_dir, review, small_args  # noqa: F401
from trainer import checkpoint, ope
from trainer.annotation_round import AnnotatorCandidate
from trainer.gate import GateConfig, GateDecision, gate_off_policy
from trainer.learners import annotator_off_policy, label_probs
from trainer.loop import read_rounds, run_trainer
from trainer.off_policy import held_out_outcomes


def _synthetic_log(rng: random.Random, n: int, mu: list[list[float]], pi0: list[list[float]]) -> dict[str, list]:
    xs, acts, props, rewards = [], [], [], []
    for _ in range(n):
        x = rng.randrange(len(mu))
        a = rng.choices(range(len(pi0[x])), weights=pi0[x])[0]
        xs.append(x)
        acts.append(a)
        props.append(pi0[x][a])
        rewards.append(1.0 if rng.random() < mu[x][a] else 0.0)
    return {"x": xs, "a": acts, "p": props, "r": rewards}


def test_ips_snips_and_dr_cover_the_true_value_of_a_synthetic_log() -> None:
    rng = random.Random(3)
    n_ctx, n_act = 12, 3
    mu = [[rng.uniform(0.1, 0.9) for _ in range(n_act)] for _ in range(n_ctx)]  # true accept rates
    pi0 = []  # the logging policy: softmax exploration, every action possible
    for _ in range(n_ctx):
        w = [rng.uniform(0.2, 1.0) for _ in range(n_act)]
        pi0.append([v / sum(w) for v in w])
    pi_e = []  # the target: epsilon-greedy (0.1) on its own scores, unlike the logging policy
    for _ in range(n_ctx):
        best = rng.randrange(n_act)
        pi_e.append([0.9 + 0.1 / n_act if a == best else 0.1 / n_act for a in range(n_act)])
    true = sum(sum(p * m for p, m in zip(pi_e[x], mu[x], strict=True)) for x in range(n_ctx)) / n_ctx
    q = [[min(1.0, max(0.0, m + rng.gauss(0, 0.1))) for m in row] for row in mu]  # a decent reward model

    covered = {"ips": 0, "snips": 0, "dr": 0}
    widths = {"ips": 0.0, "snips": 0.0, "dr": 0.0}
    reps = 100
    for rep in range(reps):
        log = _synthetic_log(random.Random(100 + rep), 2000, mu, pi0)
        est = ope.evaluate_label_policy(
            ope.LabelLog(log["a"], log["p"], log["r"]), [pi_e[x] for x in log["x"]], [q[x] for x in log["x"]]
        )
        for name, e in est.items():
            covered[name] += e.lower <= true <= e.upper
            widths[name] += (e.upper - e.lower) / reps
            assert e.n == 2000 and 0 < e.ess <= 2000
    for name in covered:  # nominal 95%; 100 replications: a binomial s.e. of ~2 points
        assert covered[name] >= 88, (name, covered[name])
    assert widths["dr"] < widths["ips"]  # the reward model buys precision


def test_a_greedy_target_is_valued_only_where_the_log_can_see_it() -> None:
    # Logged with a deterministic policy (propensity 1): the greedy copy of it gets the logged mean;
    # a policy that always disagrees gets weight 0 everywhere (IPS 0, SNIPS undefined).
    log = ope.LabelLog(actions=[0, 0, 1, 1], propensities=[1.0] * 4, rewards=[1.0, 0.0, 1.0, 1.0])
    same = ope.evaluate_label_policy(log, [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], [[0.5, 0.5]] * 4)
    assert same["ips"].value == same["snips"].value == pytest.approx(0.75)
    other = ope.evaluate_label_policy(log, [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], [[0.5, 0.5]] * 4)
    assert other["ips"].value == 0.0 and other["snips"].ess == 0.0
    # Every weighted item accepted: the value is 1, but 40 items do not make it certain.
    perfect = ope.snips([1.0] * 40, [2.0] * 40)
    assert perfect.value == 1.0 and 0.85 < perfect.lower < 0.99


def test_the_off_policy_gate_refuses_a_candidate_whose_lower_bound_does_not_beat_serving() -> None:
    worse = {"ope_n": 200.0, "ope_snips": 0.55, "ope_snips_lower": 0.48, "ope_snips_upper": 0.62}
    better = {"ope_n": 200.0, "ope_snips": 0.80, "ope_snips_lower": 0.74, "ope_snips_upper": 0.86}
    serving = {"ope_n": 200.0, "ope_snips": 0.70}
    on = GateConfig(ope_gate=True, ope_min_items=50)
    refused = gate_off_policy(worse, serving, on)
    assert not refused.publish and "off-policy snips lower bound 0.4800" in refused.reasons[0]
    assert gate_off_policy(better, serving, on).publish
    assert gate_off_policy(worse, serving, GateConfig()).publish  # off by default
    assert gate_off_policy({**worse, "ope_n": 10.0}, serving, on).publish  # too little evidence to refuse
    with pytest.raises(ValueError, match="ope_estimator"):
        GateConfig(ope_estimator="magic")


def _explored_label_stream(log, rng: random.Random, n: int) -> None:
    """n labels served by epsilon-greedy exploration at epsilon 1 (uniform: propensity 1/2, honestly
    logged), each accepted when right, else corrected; the truth follows the review's sentiment words."""
    decisions, feedback = [], []
    for i in range(n):
        positive = rng.random() < 0.5
        truth = "great" if positive else "other"
        served = rng.choice(["great", "other"])
        other = "other" if served == "great" else "great"
        text = review(rng, positive)
        decisions.append(
            Decision(f"E{i}", TASK, "label", text, ((served, 0.5), (other, 0.5)), 0.5, "prob", "annotator", "v0")
        )
        if served == truth:
            feedback.append(Feedback("accept", f"k-E{i}", event_id=f"E{i}"))
        elif i % 2:
            feedback.append(Feedback("reject", f"k-E{i}", event_id=f"E{i}"))
        else:
            feedback.append(Feedback("correction", f"k-E{i}", event_id=f"E{i}", label=truth))
    log.append_decisions(decisions)
    assert all(r.accepted for r in log.append_feedback(feedback, LOG_LABEL_SETS))


def test_the_trainer_values_candidates_off_policy_and_refuses_one_worse_than_serving(data_dir: Path) -> None:  # noqa: F811
    with open_feedback_log(str(data_dir / "feedback.sqlite3")) as log:
        _explored_label_stream(log, random.Random(13), 320)
    args = small_args(data_dir, models="annotator")
    args.gate.ope_gate, args.gate.ope_min_items = True, 30
    state = run_trainer(args)
    [row] = read_rounds(args)
    assert row["result"] == "published", row["reasons"]
    m, s = row["metrics"], row["serving_metrics"]
    assert m["ope_n"] >= 30 and m["ope_in_sample"] == 0.0
    assert m["ope_snips_lower"] > s["ope_snips"]  # what let it through
    assert {f"ope_{e}{k}" for e in ("ips", "snips", "dr") for k in ("", "_lower", "_upper", "_ess")} <= set(m)
    store = ModelStore(data_dir / "store")
    manifest = store.get("annotator", "v1").metrics
    assert manifest["ope_snips"] == pytest.approx(m["ope_snips"]) and "serving_ope_snips" in manifest

    # The untrained v0 as a candidate against the trained v1 now serving: worse off-policy, refused.
    state, _ = checkpoint.load_checkpoint(args.trainer_dir)
    v1 = encoder_heads.load(store.path("annotator", "v1"))
    v0 = encoder_heads.load(store.path("annotator", "v0"))
    assert isinstance(v1, AnnotatorModel) and isinstance(v0, AnnotatorModel)
    tok = encoder_heads.load_tokenizer(store.path("annotator", "v1"))
    labels = v1.spec.label_names
    logged = held_out_outcomes(list(state.outcomes.values()), labels, args.heldout_fraction, 0)
    cand = AnnotatorCandidate(v0, "held-out", {}, {}, GateDecision(True))
    with torch.no_grad():
        annotator_off_policy(
            cand, logged, labels, label_probs(v1, tok, logged, args.annotator), tok, args.annotator, args.gate
        )
    assert not cand.decision.publish and "off-policy" in cand.decision.reasons[0]
    assert cand.metrics["ope_snips_upper"] < cand.serving_metrics["ope_snips"]
