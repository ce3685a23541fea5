"""Exploration for served labels, with honest propensities.

The annotator's served label is, by default, the argmax of its calibrated probabilities: a
deterministic policy, so a logged "propensity" of that label would only be its score, not the
probability with which it was chosen, and importance weights built on it (the off-policy bandit update
on rejects, the IPS estimators in `trainer/ope.py`) would rest on a heuristic. A declared rule samples
the served label instead and logs the probability with which *that* label was chosen:

- `off`: argmax; the chosen label has probability 1 (a deterministic policy logs 1, honestly).
- `epsilon-greedy` (Sutton & Barto, 2.2): with probability epsilon a label uniformly at random, else
  the argmax: pi(a|x) = (1 - eps) [a = argmax] + eps / L.
- `softmax` (Boltzmann exploration): pi(a|x) = p(a|x)^(1/T) / sum_b p(b|x)^(1/T), i.e. a softmax of the
  log-probabilities at temperature T (T = 1 samples the model's own distribution; T -> 0 is argmax).
- `ucb` (UCB1, Auer et al. 2002, over labels): serve argmax_a p(a|x) + c sqrt(ln(N + 1) / (n_a + 1)),
  where n_a counts how often this process served label a and N = sum n_a. The bonus pushes labels the
  model rarely serves in front of people. Deterministic given the counts: the chosen label's propensity
  is 1 and every other label's 0 (true, but it means IPS cannot evaluate other policies from these logs;
  use epsilon-greedy or softmax when the log is meant for off-policy evaluation).

Pure functions over the probabilities (no torch, no grpc); the runtime calls `choose` in one place.
"""

from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass, field

from loopserve.config import PolicyConfig

RULES = ("off", "epsilon-greedy", "softmax", "ucb")


@dataclass(frozen=True)
class ExplorationRule:
    kind: str = "off"
    """One of RULES."""
    epsilon: float = 0.1
    """epsilon-greedy: share of items served a uniformly random label."""
    temperature: float = 1.0
    """softmax: temperature over the log-probabilities (> 0)."""
    ucb_c: float = 0.5
    """ucb: weight of the confidence bonus."""

    def __post_init__(self) -> None:
        if self.kind not in RULES:
            raise ValueError(f"exploration rule must be one of {', '.join(RULES)}, got {self.kind!r}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must lie in [0, 1], got {self.epsilon}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"exploration temperature must be > 0, got {self.temperature}")
        if not (math.isfinite(self.ucb_c) and self.ucb_c >= 0):
            raise ValueError(f"ucb_c must be >= 0, got {self.ucb_c}")


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda j: xs[j])


def choice_probs(rule: ExplorationRule, probs: list[float], counts: list[int] | None = None) -> list[float]:
    """pi(a|x) for every label a: the distribution the served label is drawn from (sums to 1)."""
    n = len(probs)
    out = [0.0] * n
    if rule.kind == "epsilon-greedy":
        out = [rule.epsilon / n] * n
        out[_argmax(probs)] += 1.0 - rule.epsilon
        return out
    if rule.kind == "softmax":
        logp = [math.log(max(p, 1e-300)) / rule.temperature for p in probs]
        top = max(logp)
        w = [math.exp(x - top) for x in logp]  # shifted: no overflow at tiny temperatures
        z = sum(w)
        return [x / z for x in w]
    if rule.kind == "ucb":
        c = counts or [0] * n
        total = sum(c)
        bonus = [rule.ucb_c * math.sqrt(math.log(total + 1) / (c[j] + 1)) for j in range(n)]
        out[_argmax([p + b for p, b in zip(probs, bonus, strict=True)])] = 1.0
        return out
    out[_argmax(probs)] = 1.0
    return out


def draw(pi: list[float], rng: random.Random) -> int:
    """An index drawn from the distribution `pi` (one uniform number, inverse CDF)."""
    u = rng.random()
    acc = 0.0
    for j, p in enumerate(pi):
        acc += p
        if u < acc:
            return j
    return max(j for j, p in enumerate(pi) if p > 0)  # u landed past a sum rounded under 1


@dataclass
class Explorer:
    """One task's rule with its state: the random source and, for UCB, how often each label was served.
    Thread-safe: the batcher thread and a Ray replica's threads may call `choose` at once."""

    rule: ExplorationRule
    rng: random.Random = field(default_factory=random.Random)
    counts: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def choose(self, labels: list[str], probs: list[float]) -> tuple[int, float]:
        """(index of the served label, the probability with which it was chosen)."""
        with self._lock:
            pi = choice_probs(self.rule, probs, [self.counts.get(lb, 0) for lb in labels])
            j = draw(pi, self.rng) if self.rule.kind in ("epsilon-greedy", "softmax") else _argmax(pi)
            if self.rule.kind == "ucb":
                self.counts[labels[j]] = self.counts.get(labels[j], 0) + 1
            return j, pi[j]


def rule_of(cfg: PolicyConfig) -> ExplorationRule:
    """The task's rule from the policy service's config (--explore and its parameters)."""
    return ExplorationRule(cfg.explore, cfg.explore_epsilon, cfg.explore_temperature, cfg.explore_ucb_c)
