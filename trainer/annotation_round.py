"""One annotator round, as the trainer runs it and as bench/learning.py replays it: which labels train
the candidate, what evidence judges it, how it is calibrated.

Two regimes, by the number n of human-verified labels:

- n < gate.cv_max_items (few labels): the candidate is trained **from the zero-shot base** on every
  verified label (epochs scaled to n), and judged by cross-fitting: `cv_folds` models trained from the
  base on the other folds predict each fold, so every label is evidence and none is spent on a held-out
  slice (a 15% slice with a 30-item floor starved budgets of a few hundred labels). The out-of-fold
  logits also fit the temperature, so the served probabilities are calibrated on items the models never
  saw; what they say about the candidate is trainer.oof_evidence's (a permutation test of signal, and
  leave-one-out calibrated probabilities against the base rate). The serving version is compared on the
  labels it was never trained on (those that arrived after its training cursor), paired with the
  candidate's out-of-fold answers on the same items.
  Training from the base each round (rather than on top of the serving weights) is what keeps the
  out-of-fold evidence honest: no fold model has seen its fold through an earlier version.
- n >= gate.cv_max_items: the candidate continues from the serving weights on the training share, and
  the held-out share (by content hash) judges both, paired, as before.

A candidate that passes is *checked*: its manifest says so (`meta.checked`), and only checked versions
are trusted to auto-label (policy_service flags every item of an unchecked version needs_review).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from loopserve.models import encoder_heads
from loopserve.models.encoder_heads import AnnotatorModel
from trainer import annotation_policy
from trainer.annotation_head import HeadConfig, head_oof_logits
from trainer.annotation_policy import AnnotationPolicyConfig
from trainer.examples import BanditExample, LabelExample
from trainer.gate import (
    GateConfig,
    GateDecision,
    LossGuard,
    gate_against_serving,
    gate_annotator,
    paired_counts,
)
from trainer.oof_evidence import fresh_evidence, oof_metrics
from trainer.pseudo_labels import self_train


@dataclass
class AnnotatorCandidate:
    model: AnnotatorModel
    regime: str
    """"cross-fit" (few labels, trained from the base) | "held-out" (continued from serving)."""
    metrics: dict[str, float]
    serving_metrics: dict[str, float]
    decision: GateDecision
    train_metrics: dict[str, float] = field(default_factory=dict)


def correct_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1) == labels  # (N,) bool


def cross_fit_round(
    load_base: Callable[[], AnnotatorModel],
    serving: AnnotatorModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[LabelExample],
    serving_cursor: int,
    cfg: AnnotationPolicyConfig,
    gate: GateConfig,
    *,
    serving_checked: bool = False,
    generator: torch.Generator | None = None,
    guard: LossGuard | None = None,
    head_cfg: HeadConfig | None = None,
    pool: Sequence[str] = (),
) -> AnnotatorCandidate:
    """The few-labels round (module docstring). `serving_cursor`: the log position the serving version was
    trained up to (0 for the base): items with a later seq are ones it never saw. A candidate whose
    evidence makes it serve-worthy but not checked replaces a `serving_checked` version only where the new
    labels refute its check or the candidate beats its recipe (the online tier's head fit, `head_cfg`) on
    the same folds (trainer.gate.gate_against_serving). `pool`: unlabelled texts; with
    `cfg.pseudo_label_ratio` above 0 every fold model and the candidate self-train on them
    (trainer.pseudo_labels.self_train), so the evidence is the served recipe's."""
    labels = annotation_policy.label_tensor(serving, items)  # (N,)
    n_labels = len(serving.spec.label_names)
    texts = {x.text for x in items}

    def refine(teacher: AnnotatorModel, train: Sequence[LabelExample]) -> tuple[AnnotatorModel, dict[str, float]]:
        # Leaves out every labelled text, the fold's own included: a fold model never sees its fold's texts.
        return self_train(
            load_base, teacher, tokenizer, train, pool, cfg, answered=texts, generator=generator, guard=guard
        )

    self_training = cfg.pseudo_label_ratio > 0 and bool(pool)
    fit = annotation_policy.cross_fit_logits(
        load_base, tokenizer, items, cfg, folds=gate.cv_folds, n_labels=n_labels, generator=generator, guard=guard,
        refine=(lambda teacher, train: refine(teacher, train)[0]) if self_training else None,
    )  # fmt: skip
    oof = fit.logits  # (N, L)
    folds = torch.tensor([annotation_policy.fold_of(x.text, gate.cv_folds) for x in items])
    metrics = oof_metrics(oof, labels, folds, cfg.ece_bins)
    temperature = metrics["temperature"]
    fraction = 1.0
    if fit.at_fraction:  # early stopping: how long the candidate trains, and its temperature there
        fraction, nll = annotation_policy.pick_stop(fit.at_fraction, labels)
        temperature = annotation_policy.fit_temperature(fit.at_fraction[fraction], labels)
        metrics.update(stop_fraction=fraction, **{f"stop_nll_{q:g}": v for q, v in nll.items()})
    cand_correct = correct_of(oof, labels)
    fresh = [i for i, x in enumerate(items) if x.seq > serving_cursor]
    serving_metrics: dict[str, float] = {"n_fresh": float(len(fresh))}
    if fresh:
        s_logits = annotation_policy.predict_logits(serving, tokenizer, [items[i].text for i in fresh], cfg)
        serving_metrics.update(fresh_evidence(s_logits, labels[fresh], cfg.ece_bins))
        metrics.update(paired_counts(correct_of(s_logits, labels[fresh]), cand_correct[fresh]))
        metrics["fresh_accuracy"] = float(cand_correct[fresh].float().mean())

    def against_recipe() -> dict[str, float]:  # the checked version's recipe, on the same folds, paired
        recipe = recipe_oof_logits(serving, tokenizer, items, labels, folds, cfg, head_cfg or HeadConfig())
        recipe_correct = correct_of(recipe, labels)
        counts = paired_counts(recipe_correct, cand_correct)
        metrics.update(
            recipe_accuracy=float(recipe_correct.float().mean()),
            recipe_broken=counts["broken"],
            recipe_fixed=counts["fixed"],
        )
        return counts

    decision = gate_against_serving(
        metrics, serving_metrics, gate, serving_checked=serving_checked, recipe=against_recipe
    )
    model = load_base()
    train_metrics: dict[str, float] = {}
    if decision.publish:  # the candidate: every verified label, from the base, calibrated out of fold
        train_metrics = annotation_policy.train_annotation_policy(
            model, tokenizer, items, [], cfg, guard=guard, generator=generator, schedule_fraction=fraction
        )
        if self_training:  # the student's training figures where one trained, the teacher's otherwise
            model, student = refine(model, items)
            train_metrics = {**train_metrics, **student}
            metrics["n_pseudo"] = student["n_pseudo"]
        model.spec.temperature = model.spec.temperature * temperature
    metrics.update(temperature=model.spec.temperature, n_train=float(len(items)), folds=float(gate.cv_folds))
    return AnnotatorCandidate(model, "cross-fit", metrics, serving_metrics, decision, train_metrics)


def recipe_oof_logits(
    serving: AnnotatorModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[LabelExample],
    labels: torch.Tensor,
    folds: torch.Tensor,
    cfg: AnnotationPolicyConfig,
    head_cfg: HeadConfig,
) -> torch.Tensor:
    """(N, L) out-of-fold logits of the online tier's recipe for the serving version on `folds`: a head
    on the serving encoder's embeddings, fitted per fold on the others (trainer.annotation_head) from the
    head saved with that encoder (`encoder_heads.encoder_head`): the serving head itself, where a head-only
    version serves, was fitted on every one of these labels, and bench/learning.py seed 1's checked head,
    testing at 0.644, answered 0.88 of its 50 labels out of fold pulled towards it (16 broken to 1 fixed
    against a fine-tune whose same labels, trained ungated, tested at 0.77). Where the encoder itself was
    fine-tuned on some of the items its answers there are in-sample, which only makes the recipe harder
    to beat."""
    texts = [x.text for x in items]
    dtype = annotation_policy.eval_dtype(serving, cfg)
    emb = annotation_policy.embed_texts(serving, tokenizer, texts, cfg.eval_batch_size, cfg.max_length, dtype)  # (N, C)
    w0, b0 = encoder_heads.encoder_head(serving)  # as the online tier fits it: no prior that saw the folds
    return head_oof_logits(emb, labels, folds, w0, b0, head_cfg)


def held_out_round(
    model: AnnotatorModel,
    tokenizer: PreTrainedTokenizerBase,
    train: Sequence[LabelExample],
    rejects: Sequence[BanditExample],
    evals: Sequence[LabelExample],
    cfg: AnnotationPolicyConfig,
    gate: GateConfig,
    *,
    baseline: float = 0.5,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    guard: LossGuard | None = None,
    pseudo: Sequence[LabelExample] = (),
) -> AnnotatorCandidate:
    """The many-labels round: `model` (the serving weights) is trained in place on `train`, `pseudo` (the
    serving version's own confident labels on unlabelled items: trainer.pseudo_labels) and `rejects`, then
    judged against its own starting point on the held-out `evals` (human labels only), paired. With
    `epochs` 0 (scaled with the data) it makes one pass: it continues from weights that already fit most
    of the buffer."""
    if not cfg.epochs:
        cfg = dataclasses.replace(cfg, epochs=1.0)
    serving_metrics, serving_correct = annotation_policy.evaluate_with_correct(model, tokenizer, evals, cfg)
    train_metrics = annotation_policy.train_annotation_policy(
        model,
        tokenizer,
        [*train, *pseudo],
        rejects,
        cfg,
        baseline=baseline,
        optimizer=optimizer,
        guard=guard,
        generator=generator,
    )
    cand, cand_correct = annotation_policy.evaluate_with_correct(model, tokenizer, evals, cfg)
    cand.update(paired_counts(serving_correct, cand_correct))  # for the gate's paired regression test
    temperature = annotation_policy.calibrate(model, tokenizer, evals, cfg)
    calibrated = annotation_policy.evaluate_annotation_policy(model, tokenizer, evals, cfg)
    cand.update(ece_calibrated=calibrated["ece"], nll_calibrated=calibrated["nll"], temperature=temperature)
    cand.update(n_train=float(len(train)), n_pseudo=float(len(pseudo)), n_rejects=float(len(rejects)))
    decision = gate_annotator(cand, serving_metrics, gate)
    return AnnotatorCandidate(model, "held-out", cand, serving_metrics, decision, train_metrics)
