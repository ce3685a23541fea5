"""Off-policy evaluation: the value a candidate policy would have had on logged traffic.

The log holds, for each served answer i, the context x_i, the action a_i served, the probability
p_i = pi_0(a_i | x_i) with which the logging policy chose it (its propensity), and a reward r_i from
feedback (accept 1, reject 0). With w_i = pi_e(a_i | x_i) / p_i the importance weight of the policy
pi_e under evaluation (Horvitz & Thompson 1952; Dudik, Langford & Li 2011, "Doubly Robust Policy
Evaluation and Learning"; Swaminathan & Joachims 2015 for self-normalisation):

    IPS    V = 1/n sum_i w_i r_i                                   unbiased when p_i > 0 wherever pi_e > 0
    SNIPS  V = sum_i w_i r_i / sum_i w_i                           biased O(1/n), far lower variance
    DR     V = 1/n sum_i [ sum_a pi_e(a|x_i) q(x_i, a) + w_i (r_i - q(x_i, a_i)) ]
                                                                   unbiased if either p or q is right

Confidence intervals are normal (CLT) intervals, V +- z * se:
    IPS, DR: se = std(per-item terms) / sqrt(n)
    SNIPS:   se = sqrt( sum_i w_i^2 (r_i - V)^2 ) / sum_i w_i      (delta method; for rewards in [0, 1]
             at least sqrt(p (1 - p) / ESS) with p = (V ESS + 1) / (ESS + 2), so that a log where every
             weighted item was accepted does not give an interval of width 0)
and the effective sample size ESS = (sum w)^2 / sum w^2 says how many logged items the estimate is
really worth (a target far from the logging policy leaves few). The weights are clipped at
`max_weight` when one is given (a clipped IPS is biased low, in exchange for bounded variance).

No library here: Open Bandit Pipeline (`obp`, the standard one) last released in 2023 and pins old
scikit-learn / pandas; the three estimators are the few lines below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z_95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    value: float
    lower: float
    upper: float
    n: int
    ess: float
    """Effective sample size of the importance weights."""

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}": self.value,
            f"{prefix}_lower": self.lower,
            f"{prefix}_upper": self.upper,
            f"{prefix}_ess": self.ess,
        }


def _ess(w: Sequence[float]) -> float:
    s2 = sum(x * x for x in w)
    return sum(w) ** 2 / s2 if s2 > 0 else 0.0


def _mean_ci(terms: Sequence[float], w: Sequence[float], z: float) -> Estimate:
    n = len(terms)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, 0.0)
    mean = sum(terms) / n
    var = sum((t - mean) ** 2 for t in terms) / (n - 1) if n > 1 else math.inf
    se = math.sqrt(var / n)
    return Estimate(mean, mean - z * se, mean + z * se, n, _ess(w))


def weights(target: Sequence[float], propensity: Sequence[float], max_weight: float = math.inf) -> list[float]:
    """w_i = min(pi_e(a_i|x_i) / pi_0(a_i|x_i), max_weight)."""
    return [min(t / p, max_weight) for t, p in zip(target, propensity, strict=True)]


def ips(rewards: Sequence[float], w: Sequence[float], z: float = Z_95) -> Estimate:
    return _mean_ci([wi * r for wi, r in zip(w, rewards, strict=True)], w, z)


def snips(rewards: Sequence[float], w: Sequence[float], z: float = Z_95) -> Estimate:
    n, sw = len(w), sum(w)
    if n == 0 or sw <= 0:
        return Estimate(math.nan, math.nan, math.nan, n, 0.0)
    value = sum(wi * r for wi, r in zip(w, rewards, strict=True)) / sw
    se = math.sqrt(sum(wi * wi * (r - value) ** 2 for wi, r in zip(w, rewards, strict=True))) / sw
    ess = _ess(w)
    if all(0.0 <= r <= 1.0 for r in rewards):
        # Rewards in [0, 1] that all agree (every weighted item accepted) give se 0: an interval of
        # width 0 from a few dozen items. Floor it at the binomial se of the Agresti-Coull-shrunk value
        # over the effective sample size, as a proportion's interval would be.
        shrunk = (value * ess + 1.0) / (ess + 2.0)
        se = max(se, math.sqrt(shrunk * (1.0 - shrunk) / ess)) if ess > 0 else se
    return Estimate(value, value - z * se, value + z * se, n, ess)


def doubly_robust(
    rewards: Sequence[float],
    w: Sequence[float],
    q_logged: Sequence[float],
    v_direct: Sequence[float],
    z: float = Z_95,
) -> Estimate:
    """`q_logged[i]` = q(x_i, a_i), the reward model's guess for the served action; `v_direct[i]` =
    sum_a pi_e(a|x_i) q(x_i, a), the direct-method value of the target policy on context i."""
    terms = [
        v + wi * (r - q) for r, wi, q, v in zip(rewards, w, q_logged, v_direct, strict=True)
    ]  # (n,) per-context DR terms
    return _mean_ci(terms, w, z)


@dataclass(frozen=True)
class LabelLog:
    """Logged label decisions with feedback, as arrays over items i (what `evaluate_label_policy` needs)."""

    actions: Sequence[int]
    """a_i: index of the served label."""
    propensities: Sequence[float]
    """p_i = pi_0(a_i | x_i), as logged."""
    rewards: Sequence[float]
    """r_i: 1 accepted, 0 rejected or corrected to another label."""


def evaluate_label_policy(
    log: LabelLog,
    target: Sequence[Sequence[float]],
    q: Sequence[Sequence[float]],
    *,
    max_weight: float = math.inf,
    z: float = Z_95,
) -> dict[str, Estimate]:
    """IPS, SNIPS and DR value of the label policy `target` (n, L): pi_e(a | x_i) for every label, with
    `q` (n, L) the reward model of DR (the probability each label would be accepted)."""
    pi_a = [row[a] for row, a in zip(target, log.actions, strict=True)]
    w = weights(pi_a, log.propensities, max_weight)
    q_logged = [row[a] for row, a in zip(q, log.actions, strict=True)]
    v_direct = [sum(p * qa for p, qa in zip(pt, qt, strict=True)) for pt, qt in zip(target, q, strict=True)]
    return {
        "ips": ips(log.rewards, w, z),
        "snips": snips(log.rewards, w, z),
        "dr": doubly_robust(log.rewards, w, q_logged, v_direct, z),
    }


def greedy(probs: Sequence[Sequence[float]]) -> list[list[float]]:
    """The deterministic policy that serves each row's argmax: one-hot rows (n, L)."""
    out = []
    for p in probs:
        best = max(range(len(p)), key=lambda j: p[j])
        out.append([1.0 if j == best else 0.0 for j in range(len(p))])
    return out
