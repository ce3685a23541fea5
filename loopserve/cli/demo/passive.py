"""Offline baselines for the annotation demo, trained with the trainer's own code and recipe.

- Passive: the same number of human labels as the loop spent, bought for items drawn at random (no
  model chooses them), from the same simulated annotator pool, trained on the same schedule as the
  loop's rounds and in the trainer's two regimes (trainer.annotation_round): while a round has fewer
  than `cv_max_items` labels it trains from the base on all of them; from then on it continues from
  the previous round's weights on the labels outside the held-out share, self-training (when the config
  turns it on) on the items it did not buy labels for as the trainer does (trainer.pseudo_labels; the
  previous round's weights label them, as the trainer's checked serving version does). Same
  AnnotationPolicyConfig.
  What differs is only which items got human labels: that is the comparison "a loop beats random
  sampling at the same budget" asks for.
- Ceiling (`--measure-ceiling`): every train label, `epochs` passes, same config otherwise.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from loopserve.datasets import Example
from loopserve.models import encoder_heads
from loopserve.models.encoder_heads import AnnotatorModel
from trainer import annotation_policy
from trainer.annotation_policy import AnnotationPolicyConfig
from trainer.examples import LabelExample, heldout
from trainer.pseudo_labels import pseudo_labels, self_train

logger = logging.getLogger(__name__)


def load_annotator(folder: Path) -> AnnotatorModel:
    model = encoder_heads.load(folder)
    assert isinstance(model, AnnotatorModel)
    return model


def accuracy_on(
    model: AnnotatorModel, tokenizer: PreTrainedTokenizerBase, test: Sequence[Example], cfg: AnnotationPolicyConfig
) -> float:
    names = model.spec.label_names
    labels = torch.tensor([names.index(e.label) for e in test])  # (N,)
    logits = annotation_policy.predict_logits(model, tokenizer, [e.text for e in test], cfg)  # (N, L)
    return float((logits.argmax(-1) == labels).float().mean())


def train_offline(
    base_folder: Path,
    labelled: Sequence[tuple[str, str]],
    schedule: Sequence[int],
    test: Sequence[Example],
    cfg: AnnotationPolicyConfig,
    *,
    heldout_fraction: float,
    cv_max_items: int = 0,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    pool: Sequence[str] = (),
) -> dict[str, float]:
    """Train the base annotator on `labelled[:n]` for each n in `schedule` in turn; test accuracy with
    the encoder cast to `cfg.eval_dtype` (the precision the loop's versions were served and evaluated in). A
    round under `cv_max_items` followed by another is skipped: that one starts from the base again, so
    the result is the same as training only the last of them (and the schedule's early rounds cost the
    default demo's baseline about a seventh of its steps).
    `pool`: items without a bought label, for self-training (trainer.pseudo_labels)."""
    t0 = time.monotonic()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = load_annotator(base_folder)
    tokenizer = encoder_heads.load_tokenizer(base_folder)
    known = set(model.spec.label_names)
    opt = annotation_policy.make_optimizer(model, cfg)
    steps = 0.0
    for k, n in enumerate(schedule, 1):
        few = n < cv_max_items
        if few and k < len(schedule) and schedule[k] < cv_max_items:
            continue  # the next round starts from the base too: these weights would be thrown away unused
        if few:  # as the trainer's cross-fitted round: from the base, on every label
            model = load_annotator(base_folder)
            opt = annotation_policy.make_optimizer(model, cfg)
        items = [
            LabelExample(text, label, f"offline-{i}", i + 1)
            for i, (text, label) in enumerate(labelled[:n])
            if label in known and (few or not heldout(text, heldout_fraction))
        ]
        pseudo: list[LabelExample] = []
        if not few and k > 1 and cfg.heldout_self_training:  # weights a round trained label the unbought items
            pseudo = pseudo_labels(model, tokenizer, pool, items, cfg, heldout_fraction=heldout_fraction)
        m = annotation_policy.train_annotation_policy(
            model, tokenizer, [*items, *pseudo], [], cfg, optimizer=opt, generator=gen
        )
        steps += m.get("steps", 0.0)
        n_pseudo = len(pseudo)
        if few:  # the cross-fitted candidate's self-training (a no-op when off): a student from the base
            model, m = self_train(
                lambda: load_annotator(base_folder), model, tokenizer, items, pool, cfg, generator=gen
            )
            steps, n_pseudo = steps + m.get("steps", 0.0), int(m["n_pseudo"])
        if progress:
            progress(f"round {k}/{len(schedule)}: {len(items)} labels, {n_pseudo} pseudo-labels")
    model.encoder.to(annotation_policy.eval_dtype(model, cfg))  # as the services load it; the head stays fp32
    acc = accuracy_on(model, tokenizer, test, cfg)
    return {
        "accuracy": acc,
        "steps": steps,
        "seconds": time.monotonic() - t0,
        "labels": float(max(schedule, default=0)),
    }


def passive_labels(
    train: Sequence[Example], budget: int, noisy: Callable[[str], str], seed: int
) -> list[tuple[str, str]]:
    """`budget` items drawn at random, each labelled by one simulated annotator."""
    rng = random.Random(seed + 7919)
    return [(e.text, noisy(e.label)) for e in rng.sample(list(train), min(budget, len(train)))]
