"""The annotator's online tier: a new head on the serving encoder's cached embeddings, every few labels.

Full rounds (trainer.annotation_round) fine-tune the encoder and take minutes on a CPU; between them a
correction should reach the served weights in seconds. The head is a linear map of the L2-normalised
mean-pooled embedding (Sentence-BERT), so with the encoder frozen the head's fit is regularised
logistic regression on cached embeddings (trainer.head_fit), pulled towards the head saved with the
encoder (never towards a head fitted on these labels). It takes milliseconds, so the gate can
cross-validate the fit itself (k folds, out-of-fold logits) at no cost in labels, and the temperature
is fitted out of fold.

The version it publishes shares the encoder's weights file with its parent (hard link) and carries the
head in head.safetensors; it is published only if LATEST is still the version it was computed on.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from loopserve.models import encoder_heads
from loopserve.models.encoder_heads import AnnotatorModel, HeadSpec
from trainer.annotation_policy import embed_texts
from trainer.examples import LabelExample
from trainer.gate import GateConfig, GateDecision, gate_against_serving, paired_counts
from trainer.head_fit import fit_head
from trainer.oof_evidence import fresh_evidence, oof_metrics


@dataclass
class HeadConfig:
    l2: float = 1e-2
    """lambda: pull of the fitted head towards the encoder's own head (`encoder_heads.encoder_head`), per
    item (the CE is averaged)."""
    folds: int = 5
    """Cross-validation folds of the head fit for the gate and the temperature."""
    max_iter: int = 100
    """LBFGS iterations per fit."""
    batch_size: int = 64
    """Items per encoder forward when embedding new labels."""


class EmbeddingCache:
    """Embeddings of labelled texts under one encoder version; recomputed when the encoder changes."""

    def __init__(self) -> None:
        self.key: tuple[str, torch.dtype] | None = None
        """The encoder (its weights' digest) and the precision the cached vectors were made with."""
        self.vectors: dict[str, torch.Tensor] = {}

    def embed(
        self,
        model: AnnotatorModel,
        tokenizer: PreTrainedTokenizerBase,
        texts: Sequence[str],
        encoder_key: str,
        cfg: HeadConfig,
        max_length: int,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """(N, C) float32 embeddings of `texts` (forward passes in `dtype`: trainer.annotation_policy.embed_texts),
        computing only those not cached for `encoder_key` and `dtype`."""
        if (encoder_key, dtype) != self.key:
            self.key, self.vectors = (encoder_key, dtype), {}
        todo = sorted({t for t in texts if t not in self.vectors}, key=len)  # like lengths pad alike
        fresh = embed_texts(model, tokenizer, todo, cfg.batch_size, max_length, dtype)
        self.vectors.update(zip(todo, fresh, strict=True))
        return torch.stack([self.vectors[t] for t in texts])


def fold_of(text: str, k: int) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") % k


@dataclass
class HeadCandidate:
    weight: torch.Tensor
    bias: torch.Tensor
    temperature: float
    metrics: dict[str, float]
    serving_metrics: dict[str, float]
    decision: GateDecision

    def head_and_spec(self, head: torch.nn.Linear, spec: HeadSpec) -> tuple[torch.nn.Linear, HeadSpec]:
        """A copy of the serving `head` carrying this candidate's weights, and `spec` with its temperature:
        what the head-only version serves with (the trainer saves them; bench/learning.py serves them)."""
        new = copy.deepcopy(head)
        with torch.no_grad():
            new.weight.copy_(self.weight)
            new.bias.copy_(self.bias)
        return new, dataclasses.replace(spec, temperature=self.temperature)


def head_oof_logits(
    emb: torch.Tensor, labels: torch.Tensor, folds: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, cfg: HeadConfig
) -> torch.Tensor:
    """(N, L) out-of-fold logits of the head's fit: each fold answered by the head fitted on the others'
    embeddings `emb` (N, C), pulled towards `w0` (L, C), `b0` (L,); zeros for a fold with no other."""
    oof = torch.zeros(labels.numel(), w0.shape[0])
    for f in torch.unique(folds).tolist():
        test = folds == f
        if (~test).any():
            w, b = fit_head(emb[~test], labels[~test], w0, b0, l2=cfg.l2, max_iter=cfg.max_iter)
            oof[test] = emb[test] @ w.T + b
    return oof


def head_round(
    serving: AnnotatorModel,
    emb: torch.Tensor,
    items: Sequence[LabelExample],
    serving_cursor: int,
    cfg: HeadConfig,
    gate: GateConfig,
    serving_checked: bool = False,
) -> HeadCandidate:
    """Fit, cross-validate and gate a new head for `serving` on the embeddings `emb` (N, C) of `items`."""
    index = {name: i for i, name in enumerate(serving.spec.label_names)}
    labels = torch.tensor([index[x.label] for x in items], dtype=torch.long)  # (N,)
    # The prior is the encoder's own head, not the serving head: a head-only serving version was fitted on
    # these labels, and pulling each fold's fit towards it leaks the fold's labels into its answers.
    w0, b0 = encoder_heads.encoder_head(serving)  # (L, C), (L,)
    k = max(2, min(cfg.folds, len(items)))
    folds = torch.tensor([fold_of(x.text, k) for x in items])
    oof = head_oof_logits(emb, labels, folds, w0, b0, cfg)
    metrics = oof_metrics(oof, labels, folds)
    temperature = metrics["temperature"]
    correct = oof.argmax(-1) == labels
    fresh = torch.tensor([x.seq > serving_cursor for x in items])
    ws, bs = serving.head.weight.detach().float().cpu(), serving.head.bias.detach().float().cpu()
    serving_logits = (emb @ ws.T + bs) / serving.spec.temperature
    serving_correct = serving_logits.argmax(-1) == labels
    serving_metrics: dict[str, float] = {"n_fresh": float(fresh.sum())}
    if fresh.any():
        serving_metrics.update(fresh_evidence(serving_logits[fresh], labels[fresh]))
        metrics.update(paired_counts(serving_correct[fresh], correct[fresh]))
    decision = gate_against_serving(metrics, serving_metrics, gate, serving_checked=serving_checked)
    w, b = fit_head(emb, labels, w0, b0, l2=cfg.l2, max_iter=cfg.max_iter)
    metrics.update(n_train=float(len(items)), folds=float(k))
    return HeadCandidate(w, b, temperature, metrics, serving_metrics, decision)
