"""Self-training for the annotator: the serving version's most confident labels on items nobody labelled.

Where labels are few, the items people never saw are most of the data. Classic self-training (Yarowsky,
1995; "pseudo-labelling", Lee, 2013) adds the confident predictions of a trusted model on those items to
the next round's training set. What it buys (AnnotationPolicyConfig.pseudo_label_ratio, on by default,
has the figures): in the few-labels regime, where a student trains from the base, +0.019 +- 0.006 test
accuracy for the loop at 300 labels on Fine Food (bench/learning.py, 3 seeds); in the held-out regime,
where the serving weights train on (`bench/learning.py --pseudo-ablation` trains each such round's twin
without pseudo-labels), nothing measurable.

Rules that keep it honest:
- In the held-out regime (many labels) only a **checked** serving version pseudo-labels (an unchecked
  one's labels are guesses): the held-out slice (by content hash) is never pseudo-labelled and no version
  ever trained on it, so the gate still judges the candidate on labels no model has seen, directly or
  through another model's labels.
- In the cross-fit regime (few labels, every round from the base) the serving version was trained on
  every fold, so its labels would carry each fold's answers into the fold models that are meant not to
  have seen them. There each model teaches itself instead (`self_train`, the classic two stages): a fold
  model trained on the other folds pseudo-labels the pool and a student from the base trains on those
  folds' labels and its pseudo-labels, then predicts its fold; the candidate does the same on every
  label. What predicts a fold never depended on that fold's labels, so the gate's permutation test stays
  exact, and the evidence and the temperature are the self-trained recipe's, the one that is served.
- Class-balanced to the human labels' shares, most confident first, so the pseudo-labels do not pull the
  model towards whatever class it already over-predicts (confirmation bias).
- A pseudo-label is never kept: each round labels the pool again with the version then serving.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from loopserve.models.encoder_heads import AnnotatorModel
from trainer import annotation_policy
from trainer.annotation_policy import AnnotationPolicyConfig
from trainer.examples import LabelExample, heldout
from trainer.gate import LossGuard

PSEUDO_SOURCE = "pseudo"


def pick_pseudo_labels(
    probs: torch.Tensor, texts: Sequence[str], label_names: Sequence[str], human: Sequence[LabelExample], cap: int
) -> list[LabelExample]:
    """Up to `cap` examples from `texts` (N) with `probs` (N, L): each label's share of the cap is its share
    of the `human` labels, filled with the items predicted as that label, most confident first."""
    if cap <= 0 or not human or not len(texts):
        return []
    conf, pred = probs.max(-1)  # (N,), (N,)
    order = torch.argsort(conf, descending=True).tolist()
    shares = Counter(x.label for x in human)
    out: list[LabelExample] = []
    for k, name in enumerate(label_names):
        quota = round(cap * shares[name] / len(human))
        picked = [i for i in order if pred[i] == k][:quota]
        out += [LabelExample(texts[i], name, f"pseudo-{i}", 0, source=PSEUDO_SOURCE) for i in picked]
    return out


def pseudo_labels(
    model: AnnotatorModel,
    tokenizer: PreTrainedTokenizerBase,
    pool: Sequence[str],
    human: Sequence[LabelExample],
    cfg: AnnotationPolicyConfig,
    *,
    heldout_fraction: float,
    answered: Collection[str] = (),
) -> list[LabelExample]:
    """`cfg.pseudo_label_ratio` pseudo-labels per human label (at most `cfg.pseudo_label_max`) from
    `model` on the items of `pool` that nobody labelled: neither the `human` labels' texts nor `answered`
    (other texts a person judged, e.g. rejects: "not that" is no label to guess over), and none of the
    held-out slice (`heldout_fraction`, by content hash, as the round splits it). At most
    `cfg.pseudo_pool_max` of those items (the last ones: the most recent) are scored."""
    cap = min(int(cfg.pseudo_label_ratio * len(human)), cfg.pseudo_label_max)
    if cap <= 0 or not pool:
        return []
    skip = {x.text for x in human}.union(answered)
    texts = [t for t in pool if t not in skip and not heldout(t, heldout_fraction)]
    if cfg.pseudo_pool_max:
        texts = texts[-cfg.pseudo_pool_max :]
    if not texts:
        return []
    probs = torch.softmax(annotation_policy.predict_logits(model, tokenizer, texts, cfg), -1)  # (N, L)
    return pick_pseudo_labels(probs, texts, model.spec.label_names, human, cap)


def self_train(
    load_base: Callable[[], AnnotatorModel],
    teacher: AnnotatorModel,
    tokenizer: PreTrainedTokenizerBase,
    labelled: Sequence[LabelExample],
    pool: Sequence[str],
    cfg: AnnotationPolicyConfig,
    *,
    answered: Collection[str] = (),
    generator: torch.Generator | None = None,
    guard: LossGuard | None = None,
) -> tuple[AnnotatorModel, dict[str, float]]:
    """The cross-fit regime's self-training (module docstring): `teacher`, trained from the base on
    `labelled`, pseudo-labels the items of `pool` nobody labelled (`pseudo_labels`; `answered`: more texts
    to leave out), and a student trains from the base on `labelled` and those with the round's recipe.
    Returns the student and its training metrics with `n_pseudo`; the teacher and {"n_pseudo": 0} where
    there is nothing to add (self-training off, no pool)."""
    pseudo = pseudo_labels(teacher, tokenizer, pool, labelled, cfg, heldout_fraction=0.0, answered=answered)
    if not pseudo:
        return teacher, {"n_pseudo": 0.0}
    student = load_base()
    metrics = annotation_policy.train_annotation_policy(
        student, tokenizer, [*labelled, *pseudo], [], cfg, guard=guard, generator=generator
    )
    return student, {**metrics, "n_pseudo": float(len(pseudo))}
