"""Learning curves of the annotation loop against passive random sampling and TF-IDF + logistic regression.

    python bench/learning.py [--budgets 50,100,200,300,500,1000] [--seeds 3] [--dataset FILE]

For each seed, two replays of the same data in one process, with the trainer's own code:

- loop: the train split is streamed in chunks of `--chunk`; the serving version scores each chunk; the
  app's router (loopserve.annotation.routing.route_chunk, the function the demo's app calls) spends
  the chunk's share of the budget (`--fraction` of the items streamed) on the chunk and the backlog of
  flagged items still waiting (`--pool backlog`, as the demo's app does; `--pool chunk`: the chunk
  only), the backlog re-annotated by each newly served version, and what a checked version's flagged
  items leave of the share goes to its least certain confident items as `--top-up` says (never by
  default, as in the demo: the share carries over to later flagged items; stream-end: what the rest of the
  stream cannot absorb; always: all of it at once); a simulated annotator (the demo's pool,
  `--error-rate`) labels the picks; at each round point the trainer's round
  (trainer.annotation_round: cross-fitted from the base while labels are few, held-out after) makes a
  candidate, and the gate decides whether it serves. Between them, after every chunk, the trainer's
  online tier (trainer.annotation_head, as the demo's second trainer runs it; `--no-online-tier` leaves
  it out) refits the serving version's head on its encoder's embeddings of every label, cross-validated
  and gated the same way, and a head that passes serves at once. Cross-fitted rounds self-train on the
  streamed items nobody labelled (trainer.pseudo_labels, `--pseudo-label-ratio`, the trainer's default; 0:
  off), held-out rounds with `--heldout-self-training`.
  Unchecked versions flag every item, so nothing is auto-labelled on their word; items nobody reviewed
  wait in the backlog.
- passive: the same number of labels for items drawn at random, from an annotator pool of the same error
  rate (`--annotators shared`: the loop's own people, the n-th label of each with the same slip), trained
  with the same recipe at the budgets (from the base while labels are few, continued after), served
  without a gate, as the demo's offline passive baseline is; it self-trains as the loop's rounds do, on the
  items it did not buy labels for (as many as the loop has streamed by then). The items come from the whole
  train split; with `--passive-from stream`, from those the loop's stream has delivered by then, so that
  the two choose among the same items and self-train on the same pool.
- tfidf: TF-IDF (1-2 grams) + logistic regression on the passive labels and on the loop's labels.

At each budget: test accuracy and macro-F1 of the version serving, and the labelled data set's accuracy
(every item streamed so far: its human label, else the serving version's label; that is what
`loopserve dataset export` writes; for passive, the items streamed by then at `--fraction`, its labels on
the random ones it bought and its model's on the rest). A loop whose stream ends short of a budget (with
`--top-up never`, a confident checked version flags fewer items than the quota) reports its end point instead. Writes
bench/results/learning.json (CPU model recorded) and a plot with mean +- standard error over seeds. Not
run in CI: it takes tens of minutes on 2 cores. Seeds and learners can be measured in separate runs and
combined with `--merge` (`--seeds 0 --merge A B`: no new run); passive does not depend on the loop's
routing or gate, so `--learners loop` compares a routing variant against an earlier passive run of the
same seeds. A merged file whose learners ran with other settings than this run's (the data, the trainer's
recipe, the loop's routing and gate, passive's draw: same_settings) is a usage error, not a mixed mean.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    add_annotation_data_args,
    annotation_results_header,
    load_annotation_data,
    mean_se,
    merge_results,
    save_plot,
)
from loopserve.annotation.routing import route_chunk
from loopserve.annotation.top_up import TOP_UPS
from loopserve.cli.demo.annotators import AnnotatorPool
from loopserve.cli.demo.passive import accuracy_on
from loopserve.datasets import Example, label_set
from loopserve.device import resolved_dtype_name
from loopserve.models import encoder_heads
from loopserve.models.encoder_heads import AnnotatorModel
from trainer import annotation_policy
from trainer.annotation_head import EmbeddingCache, HeadCandidate, HeadConfig, head_round
from trainer.annotation_policy import AnnotationPolicyConfig
from trainer.annotation_round import AnnotatorCandidate, cross_fit_round, held_out_round
from trainer.examples import LabelExample, heldout
from trainer.gate import GateConfig, GateDecision
from trainer.pseudo_labels import pseudo_labels, self_train

RESULTS = Path(__file__).resolve().parent / "results"


class Replay:
    """One learner (loop or passive) over one seed: the serving version, its labels, its rounds."""

    def __init__(self, base: Path, cfg: AnnotationPolicyConfig, gate: GateConfig, heldout_fraction: float, seed: int):
        self.base, self.cfg, self.gate, self.frac = base, cfg, gate, heldout_fraction
        self.tokenizer = encoder_heads.load_tokenizer(base)
        self.serving = self.load_base()
        self.serve_dtype = annotation_policy.eval_dtype(self.serving, cfg)
        self.infer = self._inference_copy(self.serving)
        self.checked = False
        self.cursor = 0
        self.labelled: list[LabelExample] = []
        self.gen = torch.Generator().manual_seed(seed)
        self.rounds: list[dict[str, Any]] = []
        self.version = 0
        """Counts the serving versions (a newly served one re-annotates the backlog)."""
        self.encoder_version = 0
        """Counts the encoders served (a head-only version keeps its parent's, and its cached embeddings)."""
        self.embeddings = EmbeddingCache()
        self.head_cfg = HeadConfig()
        self.head_at = 0
        """Labels at the last head round (one per label count)."""
        self.ablation_test: list[Example] = []
        """When set (`--pseudo-ablation`), each held-out round with pseudo-labels also trains its twin
        without them, and both are scored on these items."""

    def load_base(self) -> AnnotatorModel:
        model = encoder_heads.load(self.base)
        assert isinstance(model, AnnotatorModel)
        return model

    def _inference_copy(self, model: AnnotatorModel) -> AnnotatorModel:
        infer = copy.deepcopy(model)
        infer.encoder.to(self.serve_dtype)  # as the services serve it (the encoder in --dtype, the head fp32)
        return infer

    def probs(self, texts: list[str]) -> np.ndarray:
        logits = annotation_policy.predict_logits(self.infer, self.tokenizer, texts, self.cfg)
        return torch.softmax(logits, -1).numpy()

    def add(self, text: str, label: str) -> None:
        n = len(self.labelled) + 1
        self.labelled.append(LabelExample(text, label, f"e{n}", n))

    def head_round(self) -> None:
        """The trainer's online tier (trainer.learners.AnnotatorHeadLearner): a new head for the serving
        encoder from its embeddings of every verified label, cross-validated and gated, served if it passes."""
        n = len(self.labelled)
        if n < self.gate.min_cv_items or n == self.head_at:
            return
        self.head_at = n
        t0 = time.monotonic()
        texts = [x.text for x in self.labelled]
        emb = self.embeddings.embed(
            self.serving, self.tokenizer, texts, str(self.encoder_version), self.head_cfg, self.cfg.max_length,
            annotation_policy.eval_dtype(self.serving, self.cfg),
        )  # fmt: skip
        cand = head_round(
            self.serving, emb, self.labelled, self.cursor, self.head_cfg, self.gate, serving_checked=self.checked
        )
        if cand.decision.publish:
            model = head_version(self.serving, cand)
            self.serving, self.checked, self.cursor = model, cand.decision.checked, n
            self.infer = self._inference_copy(model)
            self.version += 1
        self.rounds.append(round_record(n, "head", cand.decision, cand.metrics, t0))
        print(f"    head at {n} labels: {cand.decision.summary()} ({self.rounds[-1]['seconds']}s)", flush=True)

    def round(self, gated: bool = True, pool: list[str] | None = None) -> AnnotatorCandidate | None:
        """The trainer's round; `gated=False` (the passive baseline, as the demo's offline one) trains the
        candidate the same way and serves it without the gate's cross-fitting. `pool`: the items streamed
        that nobody labelled, which a held-out round self-trains on (trainer.pseudo_labels), as the
        trainer does with the items it has read from the log."""
        t0 = time.monotonic()
        n = len(self.labelled)
        ablation: dict[str, float] = {}  # --pseudo-ablation: test accuracy with and without pseudo-labels
        if not gated and n < self.gate.cv_max_items:
            model, student = self.train_ungated(pool or [], self.gen)
            self.serving, self.infer = model, self._inference_copy(model)
            self.checked = True  # served ungated, as if checked: the passive baseline trusts its own rounds
            self.version += 1
            self.rounds.append(
                {
                    "labels": n,
                    "regime": "ungated",
                    "pseudo_labels": student["n_pseudo"],
                    "seconds": round(time.monotonic() - t0, 1),
                }
            )
            return None
        if n < self.gate.cv_max_items:
            cand = cross_fit_round(
                self.load_base, self.serving, self.tokenizer, self.labelled, self.cursor, self.cfg, self.gate,
                serving_checked=self.checked, generator=self.gen, head_cfg=self.head_cfg, pool=pool or [],
            )  # fmt: skip
        else:
            train = [x for x in self.labelled if not heldout(x.text, self.frac)]
            evals = [x for x in self.labelled if heldout(x.text, self.frac)]
            model = copy.deepcopy(self.serving)
            pseudo = (
                pseudo_labels(self.serving, self.tokenizer, pool or [], train, self.cfg, heldout_fraction=self.frac)
                if self.checked and self.cfg.heldout_self_training
                else []
            )
            if pseudo and self.ablation_test:  # the same round without pseudo-labels, from the same weights
                twin, gen = copy.deepcopy(self.serving), torch.Generator()
                gen.set_state(self.gen.get_state())
                held_out_round(twin, self.tokenizer, train, [], evals, self.cfg, self.gate, generator=gen)
                ablation["test_accuracy_without_pseudo"] = self.accuracy(twin, self.ablation_test)
            cand = held_out_round(
                model, self.tokenizer, train, [], evals, self.cfg, self.gate, generator=self.gen, pseudo=pseudo
            )
            if ablation:
                ablation["test_accuracy_with_pseudo"] = self.accuracy(cand.model, self.ablation_test)
                print(f"    pseudo-label ablation: {ablation}", flush=True)
        if cand.decision.publish or not gated:
            self.serving, self.checked, self.cursor = cand.model, cand.decision.checked or not gated, n
            self.infer = self._inference_copy(cand.model)
            self.version += 1
            self.encoder_version += 1
        self.rounds.append(
            round_record(
                n,
                cand.regime,
                cand.decision,
                cand.metrics,
                t0,
                pseudo_labels=cand.metrics.get("n_pseudo", 0.0),
                **ablation,
            )
        )
        print(
            f"    round at {n} labels: {cand.regime} {cand.decision.summary()} ({self.rounds[-1]['seconds']}s)",
            flush=True,
        )
        return cand

    def train_ungated(
        self, pool: list[str], gen: torch.Generator, labelled: list[LabelExample] | None = None
    ) -> tuple[AnnotatorModel, dict[str, Any]]:
        """A candidate from the base on every label (or on `labelled`), self-trained on `pool` as the
        trainer's cross-fitted candidate is (a no-op when self-training is off), with no gate: the passive
        baseline's round."""
        labelled = self.labelled if labelled is None else labelled
        return train_ungated(self.load_base, self.tokenizer, labelled, pool, self.cfg, gen)

    def accuracy(self, model: AnnotatorModel, test: list[Example]) -> float:
        return accuracy_on(self._inference_copy(model), self.tokenizer, test, self.cfg)  # as served

    def test_metrics(self, test: list[Example], prior_shift: np.ndarray | None = None) -> dict[str, float]:
        """Accuracy and macro-F1 of the serving version on `test`; with `prior_shift` (L,) also of its logits
        plus that shift (a diagnostic: see run_loop)."""
        names = self.serving.spec.label_names
        labels = torch.tensor([names.index(e.label) for e in test])
        logits = annotation_policy.predict_logits(self.infer, self.tokenizer, [e.text for e in test], self.cfg)
        m = annotation_policy.classification_metrics(logits, labels)
        out = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
        if prior_shift is not None:
            shifted = annotation_policy.classification_metrics(logits + torch.from_numpy(prior_shift).float(), labels)
            out.update(accuracy_prior_shifted=shifted["accuracy"], macro_f1_prior_shifted=shifted["macro_f1"])
        return out


def train_ungated(
    load_base: Callable[[], AnnotatorModel],
    tokenizer: PreTrainedTokenizerBase,
    labelled: list[LabelExample],
    pool: list[str],
    cfg: AnnotationPolicyConfig,
    gen: torch.Generator,
) -> tuple[AnnotatorModel, dict[str, Any]]:
    """The passive baseline's round: a model from the base on `labelled`, then self-trained on `pool` as the
    trainer's cross-fitted candidate is (trainer.pseudo_labels.self_train; a no-op with self-training off)."""
    model = load_base()
    annotation_policy.train_annotation_policy(model, tokenizer, labelled, [], cfg, generator=gen)
    return self_train(load_base, model, tokenizer, labelled, pool, cfg, generator=gen)


def head_version(serving: AnnotatorModel, cand: HeadCandidate) -> AnnotatorModel:
    """The version a passing online-tier head makes: `serving`'s encoder with `cand`'s head, as a head-only
    version loads (the encoder's own head kept beside it)."""
    model = copy.deepcopy(serving)
    model.encoder_head = encoder_heads.encoder_head(serving)
    model.head, model.spec = cand.head_and_spec(model.head, model.spec)
    return model


def reannotate(backlog: dict[Any, np.ndarray], probs: np.ndarray, checked: bool, threshold: float) -> int:
    """A newly served version's pass over `backlog` (`probs`: its answers, in the backlog's order): a checked
    version's confident items leave it (auto-labelled), the others wait with its probabilities. Returns how
    many left."""
    left = 0
    for k, p in zip(list(backlog), probs, strict=True):
        if checked and float(p.max()) >= threshold:
            del backlog[k]
            left += 1
        else:
            backlog[k] = p
    return left


def round_record(
    n: int, regime: str, decision: GateDecision, metrics: dict[str, float], t0: float, **extra: float
) -> dict[str, Any]:
    """What a result file keeps of a round: its decision, the evidence it rested on (out-of-fold accuracy;
    `fixed` / `broken`: the candidate against the serving version on the labels that version never saw;
    `recipe_*`: against a checked serving version's head recipe on the same folds, where that decided;
    `stop_fraction`: early stopping's share of the schedule) and its time."""
    return {
        "labels": n,
        "regime": regime,
        "published": decision.publish,
        "checked": decision.checked and decision.publish,
        "reasons": decision.reasons,
        "accuracy_evidence": metrics.get("accuracy"),
        **{
            k: metrics[k]
            for k in ("signal_z", "fixed", "broken", "recipe_fixed", "recipe_broken", "stop_fraction")
            if k in metrics
        },
        **extra,
        "seconds": round(time.monotonic() - t0, 1),
    }


def tfidf_accuracy(labelled: list[tuple[str, str]], test: list[Example]) -> float:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    if len({y for _, y in labelled}) < 2:
        majority = max(set(e.label for e in test), key=lambda y: sum(e.label == y for e in test))
        return sum(e.label == majority for e in test) / len(test)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    x = vec.fit_transform([t for t, _ in labelled])
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(x, [y for _, y in labelled])
    pred = clf.predict(vec.transform([e.text for e in test]))
    return float(np.mean([p == e.label for p, e in zip(pred, test, strict=True)]))


def compact(metrics: dict[str, float]) -> str:
    return json.dumps({k: round(v, 4) for k, v in metrics.items()})


def run_loop(args: argparse.Namespace, base: Path, train: list[Example], test: list[Example], seed: int) -> dict:
    """The loop's routing and training over a stream; metrics at each budget."""
    cfg, gate = make_configs(args)
    rp = Replay(base, cfg, gate, args.heldout_fraction, seed)
    rp.ablation_test = test if args.pseudo_ablation else []
    pool = annotator_pool(args, label_set(train + test), seed, "loop")
    rng = random.Random(seed + 1)
    budgets = sorted(args.budgets)
    points = sorted({*args.early_rounds, *budgets})
    # Room for the pace line to reach the last budget even though round points hold some quota back.
    stream = train[: min(len(train), math.ceil(budgets[-1] / args.fraction) + 3 * args.chunk)]
    human: dict[int, str] = {}
    out: dict[int, dict[str, float]] = {}
    seen = 0
    last_round = -1  # labels at the last full round (one per round point)
    auto_items = 0
    bought: dict[int, list[int]] = {}  # budget -> the stream indices people labelled
    backlog: dict[int, np.ndarray] = {}  # stream index -> probabilities of the version that flagged it
    backlog_version = rp.version

    def measure(seen: int) -> dict[str, float]:
        """The serving version on the test split, and the labelled data set of the `seen` items streamed."""
        streamed = stream[:seen]
        rest = [j for j in range(seen) if j not in human]
        names = rp.serving.spec.label_names
        pr = rp.probs([streamed[j].text for j in rest]) if rest else np.zeros((0, len(names)))
        correct = sum(human[j] == streamed[j].label for j in human)
        correct += sum(names[int(pr[k].argmax())] == streamed[j].label for k, j in enumerate(rest))
        shares = {y: sum(v == y for v in human.values()) / len(human) for y in names}
        # Diagnostic: the routed labels are not distributed as the stream is (uncertain items lie near the
        # boundary), and the model learns their prior. Shift its logits by log(stream prior / label prior),
        # the stream prior estimated with no label spent: human labels plus the serving version's mean
        # probabilities over the other streamed items.
        label_prior = np.array([max(shares[y], 1e-3) for y in names])
        counts = np.array([sum(v == y for v in human.values()) for y in names], dtype=float)
        stream_prior = np.clip((counts + pr.sum(0)) / seen, 1e-3, None)
        m = rp.test_metrics(test, np.log(stream_prior) - np.log(label_prior))
        m.update(
            **{f"stream_prior_{y}": float(v) for y, v in zip(names, stream_prior, strict=True)},
            **{f"label_share_{y}": v for y, v in shares.items()},
            dataset_accuracy=correct / seen,
            items_streamed=float(seen),
            checked=float(rp.checked),
            auto_labelled_items=float(auto_items),
            human_label_accuracy=sum(human[j] == streamed[j].label for j in human) / len(human),
            tfidf_accuracy=tfidf_accuracy([(streamed[j].text, human[j]) for j in human], test),
        )
        return m

    for start in range(0, len(stream), args.chunk):
        part = stream[start : start + args.chunk]
        texts = [e.text for e in part]
        probs = rp.probs(texts)
        needs = [not rp.checked or float(p.max()) < args.review_threshold for p in probs]
        if rp.version != backlog_version and backlog:  # a newly served version re-annotates the backlog
            probs_now = rp.probs([stream[k].text for k in backlog])
            auto_items += reannotate(backlog, probs_now, rp.checked, args.review_threshold)
        backlog_version = rp.version
        pace = min(budgets[-1], int(args.fraction * (seen + len(part))))
        quota = max(0, pace - len(human))
        nxt = next((p for p in points if p > len(human)), None)
        if nxt is not None:
            quota = min(quota, nxt - len(human))  # a round sees exactly its round point's labels
        # The router's candidates: the chunk, and with --pool backlog every flagged item still waiting.
        keys = [start + i for i in range(len(part))] + (list(backlog) if args.pool == "backlog" else [])
        waiting = keys[len(part) :]
        routed = route_chunk(
            texts,
            probs,
            needs,
            [stream[k].text for k in waiting],
            [backlog[k] for k in waiting],
            quota,
            checked=rp.checked,
            audit_fraction=args.audit_fraction,
            rng=rng,
            top_up=args.top_up,
            items_left=len(stream) - start - len(part),
            budget_after=budgets[-1] - pace,
        )
        picks = [keys[i] for i in routed]
        for k in picks[:quota]:
            human[k] = pool.noisy_label(stream[k].label)
            rp.add(stream[k].text, human[k])
            backlog.pop(k, None)
        auto_items += sum(1 for i in range(len(part)) if not needs[i] and (start + i) not in human)
        backlog.update({start + i: probs[i] for i in range(len(part)) if needs[i] and (start + i) not in human})
        seen += len(part)
        if args.online_tier:
            rp.head_round()
        if len(human) in points and len(human) != last_round:
            last_round = len(human)
            rp.round(pool=[stream[j].text for j in range(seen) if j not in human])
            if len(human) in budgets:
                out[len(human)] = measure(seen)
                bought[len(human)] = sorted(human)
                if args.ungated_twin:  # the loop's labels, trained as passive trains its random ones
                    out[len(human)].update(twins(args, rp, stream[:seen], human, test, seed))
                print(f"  loop  seed {seed} budget {len(human)}: {compact(out[len(human)])}", flush=True)
    if len(out) == len(budgets):
        return {"budgets": out, "rounds": rp.rounds, "bought": bought}
    # The stream ran out short of a budget (--top-up never: once a checked version serves, only the items it
    # flags are candidates, and a confident version flags fewer than the quota, so it asked people less and
    # auto-labelled the rest). The loop's end point instead: a round at the labels it reached, measured alike.
    if len(human) != last_round:
        rp.round(pool=[stream[j].text for j in range(seen) if j not in human])
    end = {**measure(seen), "labels": float(len(human))}
    missed = [b for b in budgets if b not in out]
    print(f"  loop  seed {seed} stream ended at {len(human)} labels, short of {missed}: {compact(end)}", flush=True)
    return {"budgets": out, "end": end, "rounds": rp.rounds, "bought": bought}


def twins(
    args: argparse.Namespace, rp: Replay, streamed: list[Example], human: dict[int, str], test: list[Example], seed: int
) -> dict[str, float]:
    """--ungated-twin: the loop's labels (`human`: stream index -> label), trained as passive trains its random
    ones (from the base, self-trained on the streamed items nobody labelled, no gate), scored on `test`. With
    --twin-controls, two more the same way, each from its own generator seeded alike: the loop's items with the
    data's own labels (what the annotators' errors cost), and as many random items from the same streamed ones
    with the data's own labels (the loop's choice of items against random ones, with nothing else different)."""
    left = [streamed[j].text for j in range(len(streamed)) if j not in human]
    twin, _ = rp.train_ungated(left, torch.Generator().manual_seed(seed))
    out = {"ungated_twin_accuracy": rp.accuracy(twin, test)}
    if not args.twin_controls:
        return out
    rand = random.Random(seed + 31).sample(range(len(streamed)), len(human))
    for name, items in (("ungated_twin_clean_accuracy", sorted(human)), ("random_twin_accuracy", rand)):
        labelled = [LabelExample(streamed[j].text, streamed[j].label, f"t{j}", n) for n, j in enumerate(items, 1)]
        chosen = set(items)
        pool = [streamed[j].text for j in range(len(streamed)) if j not in chosen]
        model, _ = rp.train_ungated(pool, torch.Generator().manual_seed(seed), labelled)
        out[name] = rp.accuracy(model, test)
    return out


def run_passive(args: argparse.Namespace, base: Path, train: list[Example], test: list[Example], seed: int) -> dict:
    cfg, gate = make_configs(args)
    rp = Replay(base, cfg, gate, args.heldout_fraction, seed)
    rp.ablation_test = test if args.pseudo_ablation else []
    pool = annotator_pool(args, label_set(train + test), seed, "passive")
    budgets = sorted(args.budgets)
    streamed_at = passive_draws(args.passive_from, len(train), budgets, args.fraction, random.Random(seed + 7919))
    out: dict[int, dict[str, float]] = {}
    for p in budgets:
        streamed = [train[j] for j in streamed_at[p]]
        while len(rp.labelled) < p:
            e = streamed[len(rp.labelled)]
            rp.add(e.text, pool.noisy_label(e.label))
        # Its unlabelled pool: the items streamed by p labels, less the labelled ones.
        rp.round(gated=False, pool=[e.text for e in streamed[p:]])
        m = rp.test_metrics(test)
        m["tfidf_accuracy"] = tfidf_accuracy([(x.text, x.label) for x in rp.labelled], test)
        # Its labelled data set, as the loop's is measured: the items streamed by p labels at --fraction,
        # with the human label where it bought one and its model's label on the rest.
        names = rp.serving.spec.label_names
        guesses = rp.probs([e.text for e in streamed[p:]]).argmax(1) if len(streamed) > p else []
        right = sum(x.label == e.label for x, e in zip(rp.labelled, streamed[:p], strict=True))
        correct = right + sum(names[int(g)] == e.label for g, e in zip(guesses, streamed[p:], strict=True))
        m.update(
            dataset_accuracy=correct / len(streamed),
            items_streamed=float(len(streamed)),
            human_label_accuracy=right / p,
        )
        out[p] = m
        print(f"  passive seed {seed} budget {p}: {compact(m)}", flush=True)
    return {"budgets": out, "rounds": rp.rounds}


def annotator_pool(args: argparse.Namespace, labels: list[str], seed: int, learner: str) -> AnnotatorPool:
    """The simulated people who label a learner's purchases (the demo's pool, one review each). Passive's own
    pool (`--annotators independent`), or the loop's (`shared`): the n-th label either learner buys then comes
    from the same person with the same slip or none, so the annotators' errors cost both alike and leave the
    paired difference (common random numbers)."""
    own = learner == "passive" and args.annotators == "independent"
    return AnnotatorPool(labels, error_rate=args.error_rate, double_review=0.0, seed=seed + 1000 if own else seed)


def passive_draws(source: str, n: int, budgets: list[int], fraction: float, rng: random.Random) -> dict[int, list[int]]:
    """Budget p -> the indices into the train split that passive has streamed by p labels (p / `fraction` of
    them), the p it bought first, in the order it bought them; each budget's purchases extend the last's.
    `source` "train": a random draw from the whole split, the next items of it streamed beside them; "stream":
    the loop's own stream (the split's order, a seed's shuffle), random picks among the items it has streamed,
    so that the loop and passive choose from the same items and self-train on the same pool."""
    if source == "train":
        order = rng.sample(range(n), n)
        return {p: order[: max(p, int(p / fraction))] for p in budgets}
    out: dict[int, list[int]] = {}
    bought: list[int] = []
    taken: set[int] = set()  # bought's items
    for p in budgets:
        prefix = range(min(n, max(p, int(p / fraction))))
        new = rng.sample([j for j in prefix if j not in taken], p - len(bought))
        bought += new
        taken.update(new)
        out[p] = bought + [j for j in prefix if j not in taken]
    return out


def make_configs(args: argparse.Namespace) -> tuple[AnnotationPolicyConfig, GateConfig]:
    # The trainer's defaults, as `loopserve demo` hands them over (epochs 0: scaled with the data).
    cfg = AnnotationPolicyConfig(
        epochs=0.0,
        max_length=args.max_length,
        pseudo_label_ratio=args.pseudo_label_ratio,
        heldout_self_training=args.heldout_self_training,
        warmup_ratio=args.warmup_ratio,
        decay_ratio=args.decay_ratio,
        class_balance=args.class_balance,
        contrastive_coef=args.contrastive_coef,
        head_refit=args.head_refit,
        early_stopping=args.early_stopping,
        eval_dtype=args.dtype,  # the replay serves in it too (Replay.infer), as `loopserve demo` does
        train_dtype=args.dtype,
    )
    gate = GateConfig(
        min_eval_items=30, min_lift_z=args.min_lift_z, cv_max_items=args.cv_max_items, cv_folds=args.cv_folds
    )
    return cfg, gate


def summarise(results: dict[str, Any], budgets: list[int]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for b in budgets:
        row: dict[str, Any] = {}
        for learner, key, name in [
            ("loop", "accuracy", "loop_accuracy"),
            ("loop", "macro_f1", "loop_macro_f1"),
            ("loop", "dataset_accuracy", "loop_dataset_accuracy"),
            ("loop", "tfidf_accuracy", "tfidf_on_loop_labels"),
            ("loop", "human_label_accuracy", "loop_human_label_accuracy"),
            ("passive", "human_label_accuracy", "passive_human_label_accuracy"),
            ("passive", "accuracy", "passive_accuracy"),
            ("passive", "macro_f1", "passive_macro_f1"),
            ("passive", "tfidf_accuracy", "tfidf_on_passive_labels"),
            ("passive", "dataset_accuracy", "passive_dataset_accuracy"),
        ]:
            runs = [s[learner]["budgets"] for s in results["seeds"] if learner in s]
            vals = [r[b][key] for r in runs if key in r.get(b, {})]  # files of earlier code lack some figures
            if vals:
                row[name] = mean_se(vals)
        for key, name in [("accuracy", "loop_minus_passive"), ("dataset_accuracy", "loop_minus_passive_dataset")]:
            pairs = [
                (s["loop"]["budgets"].get(b, {}), s["passive"]["budgets"].get(b, {}))
                for s in results["seeds"]
                if "loop" in s and "passive" in s
            ]
            diffs = [loop[key] - passive[key] for loop, passive in pairs if key in loop and key in passive]
            if diffs:  # paired by seed, over the seeds where both learners have the figure
                row[name] = mean_se(diffs)
        table[str(b)] = row
    return table


def summarise_end(results: dict[str, Any]) -> dict[str, Any]:
    """The loops whose stream ran out short of a budget (run_loop): the labels they reached, and their
    figures there; empty when every loop reached every budget."""
    ends = [(s["seed"], s["loop"]["end"]) for s in results["seeds"] if "end" in s.get("loop", {})]
    if not ends:
        return {}
    return {
        "seeds": [seed for seed, _ in ends],
        "labels": [e["labels"] for _, e in ends],
        "accuracy": [e["accuracy"] for _, e in ends],
        "dataset_accuracy": [e["dataset_accuracy"] for _, e in ends],
        "auto_labelled_items": [e["auto_labelled_items"] for _, e in ends],
    }


def plot(summary: dict[str, Any], out: Path, title: str, end: dict[str, Any] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in [
        ("loop_accuracy", "loop (routing + trainer)"),
        ("passive_accuracy", "passive random sampling, same trainer"),
        ("tfidf_on_passive_labels", "TF-IDF + LR, passive labels"),
        ("loop_dataset_accuracy", "loop: labelled data set"),
        ("passive_dataset_accuracy", "passive: labelled data set"),
    ]:
        xs = [int(b) for b, row in summary.items() if key in row]
        if not xs:
            continue
        ys = [summary[str(b)][key]["mean"] for b in xs]
        es = [summary[str(b)][key]["se"] for b in xs]
        ax.errorbar(xs, ys, yerr=[0 if math.isnan(e) else e for e in es], marker="o", capsize=3, label=label)
    if end:
        ax.scatter(end["labels"], end["accuracy"], marker="x", color="C0", label="loop at the stream's end (per seed)")
    ax.set_xscale("log")
    ax.set_xlabel("human interactions")
    ax.set_ylabel("test accuracy (mean +- s.e. over seeds)")
    ax.grid(alpha=0.3)
    save_plot(fig, ax, out, title)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_annotation_data_args(ap, test_items=0)
    ap.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[50, 100, 200, 300, 500, 1000])
    ap.add_argument("--early-rounds", type=lambda s: [int(x) for x in s.split(",") if x], default=[25])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--merge", type=Path, nargs="*", default=[], help="earlier result files whose seeds to include")
    ap.add_argument(
        "--learners",
        type=lambda s: s.split(","),
        default=["loop", "passive"],
        help="which replays to run; a learner not run is taken from --merge files for the same seed (passive "
        "does not depend on the loop's routing or gate, so one passive run serves several loop variants)",
    )
    ap.add_argument("--fraction", type=float, default=0.25, help="human interactions per item streamed")
    ap.add_argument("--chunk", type=int, default=100)
    ap.add_argument(
        "--pool",
        choices=["chunk", "backlog"],
        default="backlog",
        help="the router picks from the streamed chunk only, or from the chunk and the backlog of flagged items",
    )
    ap.add_argument(
        "--top-up",
        choices=TOP_UPS,
        default="never",
        help="what a checked version's flagged items leave of a chunk's share: never (as the demo by default: carried "
        "over to later flagged items; on a finite stream a confident loop may end short of the last budget), "
        "stream-end (the least certain confident items take what the rest of the stream cannot absorb, spread over "
        "it), always (they take all of it at once; learning-top-up-to-1000.json ran so)",
    )
    ap.add_argument("--error-rate", type=float, default=0.05)
    ap.add_argument("--audit-fraction", type=float, default=0.05)
    ap.add_argument(
        "--dtype",
        default="auto",
        help="the served versions' precision, which evaluation, calibration and head refits use too, and training's "
        "(bfloat16: mixed) as `loopserve demo` runs them: auto (bf16 where the CPU multiplies it natively, fp32 "
        "elsewhere) | float32 | bfloat16. bf16 training read as fp32 to 0.002 on 7 seeds x 2 budgets "
        "(learning-small-budgets-bf16-train.json) in half the time on a CPU with AVX512-BF16; results record it",
    )
    ap.add_argument("--review-threshold", type=float, default=0.8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument(
        "--pseudo-ablation",
        action="store_true",
        help="with --heldout-self-training, each held-out round with pseudo-labels also trains its twin without them "
        "(both scored on the test items)",
    )
    ap.add_argument(
        "--pseudo-label-ratio",
        type=float,
        default=AnnotationPolicyConfig.pseudo_label_ratio,
        help="self-training (trainer.pseudo_labels): pseudo-labels per human label (0: off)",
    )
    ap.add_argument(
        "--heldout-self-training",
        action=argparse.BooleanOptionalAction,
        default=AnnotationPolicyConfig.heldout_self_training,
        help="held-out rounds self-train too, on the checked serving version's labels (off: it measured level)",
    )
    ap.add_argument(
        "--warmup-ratio", type=float, default=AnnotationPolicyConfig.warmup_ratio, help="see bench/recipe.py"
    )
    ap.add_argument("--decay-ratio", type=float, default=AnnotationPolicyConfig.decay_ratio)
    ap.add_argument(
        "--online-tier",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the loop's online tier: a head refit after every chunk (the demo runs it in a second trainer)",
    )
    ap.add_argument(
        "--class-balance",
        action=argparse.BooleanOptionalAction,
        default=AnnotationPolicyConfig.class_balance,
        help="weigh each label's cross-entropy by n / (L * n_label) (AnnotationPolicyConfig.class_balance)",
    )
    ap.add_argument(
        "--contrastive-coef",
        type=float,
        default=AnnotationPolicyConfig.contrastive_coef,
        help="weight of the SetFit-style pair loss in fine-tuning (AnnotationPolicyConfig.contrastive_coef; 0: off)",
    )
    ap.add_argument(
        "--early-stopping",
        action=argparse.BooleanOptionalAction,
        default=AnnotationPolicyConfig.early_stopping,
        help="cross-fitted rounds train the candidate for the share of its schedule the fold models score best "
        "at (AnnotationPolicyConfig.early_stopping)",
    )
    ap.add_argument(
        "--head-refit",
        action=argparse.BooleanOptionalAction,
        default=AnnotationPolicyConfig.head_refit,
        help="refit the head on the fine-tuned encoder's embeddings (AnnotationPolicyConfig.head_refit)",
    )
    ap.add_argument(
        "--ungated-twin",
        action="store_true",
        help="at each budget also train the loop's labels as the passive baseline trains its random ones (ungated, "
        "from the base) and score that model on the test items: which items the loop bought, apart from its gate",
    )
    ap.add_argument(
        "--twin-controls",
        action="store_true",
        help="with --ungated-twin, two more twins at each budget: the loop's items with the data's own labels, and "
        "as many random items from the same streamed ones with theirs (two more fine-tunes a budget)",
    )
    ap.add_argument(
        "--passive-from",
        choices=("train", "stream"),
        default="train",
        help="where passive's random labels come from: the whole train split (train, as the demo's passive baseline "
        "draws) or the items the loop's stream has delivered by then (stream: the loop's pool, paired)",
    )
    ap.add_argument(
        "--annotators",
        choices=("independent", "shared"),
        default="independent",
        help="passive's labels from its own simulated annotator pool (independent, as before) or from the loop's "
        "(shared: the n-th label each buys from the same person with the same slip, so annotator errors cancel "
        "from the paired difference)",
    )
    ap.add_argument("--heldout-fraction", type=float, default=0.15)
    ap.add_argument("--cv-max-items", type=int, default=GateConfig.cv_max_items)
    ap.add_argument(
        "--cv-folds", type=int, default=GateConfig.cv_folds, help="folds of the cross-fitted rounds (GateConfig)"
    )
    ap.add_argument("--min-lift-z", type=float, default=0.0, help="held-out regime (the demo's setting)")
    ap.add_argument("--out", type=Path, default=RESULTS / "learning.json")
    return ap


LEARNERS = ("loop", "passive")
TRAINER_SETTINGS = (
    "dataset", "test_items", "fraction", "error_rate", "dtype", "max_length", "pseudo_label_ratio",
    "heldout_self_training", "warmup_ratio", "decay_ratio", "class_balance", "contrastive_coef", "early_stopping",
    "head_refit", "heldout_fraction", "cv_max_items",
)  # fmt: skip
"""The arguments both learners' figures depend on (the data, the annotators, the trainer's recipe)."""
LEARNER_SETTINGS = {
    "loop": (
        "chunk", "pool", "top_up", "audit_fraction", "review_threshold", "early_rounds", "online_tier", "cv_folds",
        "min_lift_z",
    ),
    "passive": ("passive_from", "annotators"),
}  # fmt: skip
"""The arguments only one learner's figures depend on (the loop's routing and gate; passive's draw)."""


def same_settings(learners: set[str]) -> list[str]:
    """The arguments a merged file must share with this run, for the learners taken from it."""
    if not learners:
        return []
    return [*TRAINER_SETTINGS, *(k for learner in sorted(learners) for k in LEARNER_SETTINGS[learner])]


def held_results(files: list[dict[str, Any]]) -> dict[tuple[int, str], tuple[int, dict[str, Any]]]:
    """(seed, learner) -> the last merged file that holds that learner's result for that seed (its index in
    `files`) and the result: the one a merge takes."""
    return {(s["seed"], k): (i, s[k]) for i, r in enumerate(files) for s in r["seeds"] for k in LEARNERS if k in s}


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    args.dtype = resolved_dtype_name(args.dtype, "cpu")  # the results say which precision ran
    run_seeds = range(args.first_seed, args.first_seed + args.seeds)

    def taken(files: list[dict[str, Any]]) -> list[list[str]]:
        """Per merged file, the settings of the learners this run takes from it: a seed's learner comes from
        this run where it runs it, else from the last file that holds it (held_results)."""
        ran = {(seed, k) for seed in run_seeds for k in args.learners}
        held = held_results(files)
        return [
            same_settings({k for (seed, k), (j, _) in held.items() if j == i and (seed, k) not in ran})
            for i in range(len(files))
        ]

    # Each merged file measured with this run's settings for the learners taken from it; the results record
    # where its seeds ran (a learner's threads and seconds are its own run's).
    files, merged_records = merge_results(ap, args, args.merge, taken)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    path, train, test, base = load_annotation_data(args)
    labels = label_set(train + test)
    head = json.loads((base / "head.json").read_text()) if args.seeds else {"labels": []}
    if head["labels"] and sorted(x["name"] for x in head["labels"]) != labels:
        raise SystemExit(f"the base annotator's labels are not {labels}: pass a --data-dir whose store has them")
    results: dict[str, Any] = {**annotation_results_header(args, path, train, test), "seeds": []}
    results["merged"] = merged_records
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    earlier: dict[int, dict[str, Any]] = {}  # seed -> learner -> result
    for (seed, learner), (_, result) in held_results(files).items():
        result["budgets"] = {int(b): m for b, m in result["budgets"].items()}  # JSON made the budgets strings
        earlier.setdefault(seed, {"seed": seed})[learner] = result
    results["seeds"] = [s for seed, s in sorted(earlier.items()) if seed not in run_seeds]
    for seed in run_seeds:
        rng = random.Random(seed)
        order = list(train)
        rng.shuffle(order)
        entry = {"seed": seed, **{k: v for k, v in earlier.get(seed, {}).items() if k != "seed"}}
        for learner, run in zip(LEARNERS, (run_loop, run_passive), strict=True):
            if learner in args.learners:
                print(f"seed {seed}: {learner}", flush=True)
                entry[learner] = run(args, base, order, test, seed)
        results["seeds"].append(entry)
        results["seconds"] = round(time.monotonic() - t0, 1)
        write_results(results, args, path)
    write_results(results, args, path)
    print(json.dumps({k: results[k] for k in ("summary", "loop_end")}, indent=1))


def write_results(results: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    results["summary"] = summarise(results, sorted(args.budgets))
    results["loop_end"] = summarise_end(results)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    title = f"{path.name}: {len(results['seeds'])} seeds"
    plot(results["summary"], args.out.with_suffix(".png"), title, results["loop_end"])


if __name__ == "__main__":
    main()
