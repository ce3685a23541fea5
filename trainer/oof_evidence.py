"""What out-of-fold predictions say about a small-data candidate: signal, calibration, gain over the base rate.

While labels are few, every verified label is both trained on (by the candidate) and judged on (out of
fold, by models trained on the other folds), so the gate's evidence costs no labels. Two questions:

1. **Is there signal?** `signal_test`: a permutation test of "the out-of-fold answers are independent of
   the labels". The statistic ranks, within each fold and label, the probabilities the fold's model gave
   that label, and averages the rank each item's own label earns (`fold_ranks`: with two labels, the
   area under the ROC curve); its null distribution comes from shuffling the labels within each fold
   (each fold's model is fixed, so the shuffle is exactly the null of "this model knows nothing about
   these labels"). It needs no calibration and no common scale between the fold models, which is what
   starved the earlier evidence: a Brier gain whose temperature was fitted on the *other* fold's model
   scored a fold model trained on 25 labels at 0.78 out-of-fold accuracy as worse than the base rate
   (bench/learning.py, seed 2, 50 labels). Ranks rather than the probabilities themselves: the mean
   probability of the own label let a few confident mistakes sink a model that orders the items well,
   and a fold model fine-tuned to its labels is confident (the rounds of seeds 0, 2, 4 and 5 at 100
   labels were refused so, permutation z 1.26-1.60). Labels that are random carry no signal whatever
   was trained, so the test refuses them: the null stays exact.
2. **Are the probabilities trustworthy?** (the bar for auto-labelling) `loo_calibrated_probs`: each
   item's temperature is fitted on the other items of its fold (same model, never its own label), and
   `brier_gain` asks whether those probabilities beat "the labels come at these frequencies".
"""

from __future__ import annotations

import math

import torch

from trainer import annotation_policy
from trainer.gate import paired_counts

PERMUTATIONS = 2000
_LOG_T = torch.linspace(math.log(annotation_policy.T_MIN), math.log(annotation_policy.T_MAX), 161)


def signal_test(
    logits: torch.Tensor, labels: torch.Tensor, folds: torch.Tensor, permutations: int = PERMUTATIONS, seed: int = 0
) -> tuple[float, float]:
    """(z, p) of the within-fold permutation test on out-of-fold `logits` (N, L), `labels` (N,), `folds` (N,).

    The statistic: the mean `fold_ranks` of each item's own label. z = (observed - mean of the null) / sd
    of the null; p = (1 + #null >= observed) / (1 + permutations).
    z is 0 when the null has no spread (one label, or a model that answers every item alike), NaN when any
    logit is not finite."""
    n = labels.numel()
    if n < 2:
        return 0.0, 1.0
    if not bool(torch.isfinite(logits).all()):
        return math.nan, 1.0  # ranks would order a NaN somewhere; the gate refuses non-finite evidence
    gen = torch.Generator().manual_seed(seed)
    probs = fold_ranks(torch.softmax(logits.double(), -1), folds)
    observed = float(probs.gather(1, labels[:, None]).sum()) / n
    null = torch.zeros(permutations, dtype=torch.float64)
    for f in torch.unique(folds).tolist():
        idx = torch.nonzero(folds == f).squeeze(1)
        p, y = probs[idx], labels[idx]  # (m, L), (m,)
        perm = torch.argsort(torch.rand(permutations, idx.numel(), generator=gen), dim=1)  # (B, m)
        null += p.gather(1, y[perm].T).T.sum(1) / n  # row b: each item scored on the b-th shuffled label
    sd = float(null.std())
    z = (observed - float(null.mean())) / sd if sd > 1e-12 else 0.0
    pval = (1 + int((null >= observed - 1e-12).sum())) / (1 + permutations)
    return z, pval


def fold_ranks(probs: torch.Tensor, folds: torch.Tensor) -> torch.Tensor:
    """(N, L): for each item and label, the share of the other items of its fold given less probability of
    that label than it (ties count half), in [0, 1]. A function of each fold's answers alone, never of the
    labels, so a permutation test on it is still exact; and the same for any model that orders the
    fold's items alike, whatever its temperature."""
    ranks = torch.zeros_like(probs, dtype=torch.float64)
    for f in torch.unique(folds).tolist():
        idx = torch.nonzero(folds == f).squeeze(1)
        m = idx.numel()
        if m < 2:
            continue
        p = probs[idx].double().T.contiguous()  # (L, m)
        ordered = p.sort(1).values
        below = torch.searchsorted(ordered, p, right=False)  # items with less probability
        ties = torch.searchsorted(ordered, p, right=True) - below - 1  # others with the same
        ranks[idx] = ((below + 0.5 * ties).double() / (m - 1)).T
    return ranks


def loo_calibrated_probs(logits: torch.Tensor, labels: torch.Tensor, folds: torch.Tensor) -> torch.Tensor:
    """(N, L) probabilities of out-of-fold `logits`, each item's temperature fitted (on a grid of log T over
    [T_MIN, T_MAX]) to the other items of its own fold: the same model's scale, never its own label."""
    nll = torch.stack(
        [torch.nn.functional.cross_entropy(logits / math.exp(t), labels, reduction="none") for t in _LOG_T.tolist()], 1
    )  # (N, G)
    temps = torch.ones(labels.numel())
    for f in torch.unique(folds).tolist():
        idx = torch.nonzero(folds == f).squeeze(1)
        if idx.numel() < 2:
            continue
        rest = nll[idx].sum(0, keepdim=True) - nll[idx]  # (m, G): the fold's NLL without each item
        temps[idx] = _LOG_T[rest.argmin(1)].exp()
    return torch.softmax(logits / temps[:, None], -1)


def brier_gain(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean, paired z) of the per-item gain in Brier score of `probs` (N, L) over the base rate: what the
    model's probabilities say beyond "the labels come at these frequencies". Brier rather than log-loss:
    each item's score is bounded, so one confident mistake cannot swamp the paired test."""
    n = labels.numel()
    if n < 2:
        return 0.0, 0.0
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).float()  # (N, L)
    prior = onehot.mean(0, keepdim=True)  # (1, L)
    d = (prior - onehot).pow(2).sum(1) - (probs - onehot).pow(2).sum(1)  # (N,) Brier(prior) - Brier(model)
    sd = float(d.std())
    mean = float(d.mean())
    return mean, (mean / (sd / math.sqrt(n)) if sd > 0 else 0.0)


def fresh_evidence(logits: torch.Tensor, labels: torch.Tensor, ece_bins: int = 15) -> dict[str, float]:
    """What the serving version's answers (`logits` (N, L), as served) say on the labels it never saw: its
    metrics there, and `signal_z`, whether they carry signal about those labels (one model: one fold)."""
    out = annotation_policy.classification_metrics(logits, labels, ece_bins)
    out["signal_z"] = signal_test(logits, labels, torch.zeros_like(labels))[0]
    return out


def oof_metrics(
    logits: torch.Tensor, labels: torch.Tensor, folds: torch.Tensor, ece_bins: int = 15
) -> dict[str, float]:
    """Everything the small-data gate reads from out-of-fold logits, plus the temperature to serve with
    (fitted on all of them: the served model is trained on every label, so no item is left to spare)."""
    temperature = annotation_policy.fit_temperature(logits, labels)
    metrics = annotation_policy.classification_metrics(logits / temperature, labels, ece_bins)
    z, p = signal_test(logits, labels, folds)
    gain, gain_z = brier_gain(loo_calibrated_probs(logits, labels, folds), labels)
    majority = torch.bincount(labels, minlength=logits.shape[1]).argmax()
    pair = paired_counts(labels == majority, logits.argmax(-1) == labels)
    metrics.update(
        temperature=temperature,
        signal_z=z,
        signal_p=p,
        brier_gain=gain,
        brier_gain_z=gain_z,
        majority_broken=pair["broken"],
        majority_fixed=pair["fixed"],
    )
    return metrics
