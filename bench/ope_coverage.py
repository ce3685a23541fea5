"""How often the off-policy estimators' 95% intervals hold the true value (trainer/ope.py).

Synthetic contextual bandit with a known truth: 12 contexts, 3 actions, Bernoulli rewards with random
means, a softmax-like logging policy (every action possible), an epsilon-greedy (0.1) target unlike it,
a reward model for DR equal to the true means plus N(0, 0.1) noise. Over `--reps` independent logs of
`--n` items: coverage, mean interval width and mean ESS of IPS, SNIPS and DR (the construction of
tests/unit/test_ope.py). Writes bench/results/ope_coverage.json.

    .venv/bin/python bench/ope_coverage.py [--reps 100] [--n 2000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import machine  # noqa: E402
from trainer import ope  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ope_coverage.json")
    args = ap.parse_args()
    rng = random.Random(3)
    n_ctx, n_act = 12, 3
    mu = [[rng.uniform(0.1, 0.9) for _ in range(n_act)] for _ in range(n_ctx)]
    pi0 = []
    for _ in range(n_ctx):
        w = [rng.uniform(0.2, 1.0) for _ in range(n_act)]
        pi0.append([v / sum(w) for v in w])
    pi_e = []
    for _ in range(n_ctx):
        best = rng.randrange(n_act)
        pi_e.append([0.9 + 0.1 / n_act if a == best else 0.1 / n_act for a in range(n_act)])
    true = sum(sum(p * m for p, m in zip(pi_e[x], mu[x], strict=True)) for x in range(n_ctx)) / n_ctx
    q = [[min(1.0, max(0.0, m + rng.gauss(0, 0.1))) for m in row] for row in mu]
    names = ("ips", "snips", "dr")
    covered = dict.fromkeys(names, 0)
    width = dict.fromkeys(names, 0.0)
    ess = 0.0
    for rep in range(args.reps):
        r = random.Random(100 + rep)
        xs = [r.randrange(n_ctx) for _ in range(args.n)]
        acts = [r.choices(range(n_act), weights=pi0[x])[0] for x in xs]
        rewards = [1.0 if r.random() < mu[x][a] else 0.0 for x, a in zip(xs, acts, strict=True)]
        log = ope.LabelLog(acts, [pi0[x][a] for x, a in zip(xs, acts, strict=True)], rewards)
        est = ope.evaluate_label_policy(log, [pi_e[x] for x in xs], [q[x] for x in xs])
        for k in names:
            covered[k] += est[k].lower <= true <= est[k].upper
            width[k] += (est[k].upper - est[k].lower) / args.reps
        ess += est["ips"].ess / args.reps
    out = {
        "machine": machine(),
        "true_value": true,
        "reps": args.reps,
        "n": args.n,
        "coverage": {k: covered[k] / args.reps for k in names},
        "mean_interval_width": width,
        "mean_ess": ess,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("true_value", "coverage", "mean_interval_width", "mean_ess")}))


if __name__ == "__main__":
    main()
