"""One round skeleton for every model the trainer improves (the objectives supply the steps).

    serving <- the store's LATEST of the learner's model      (none: skipped)
    learner.select(serving)                                  (not enough data: skipped, with the reason)
    learner.load(serving)                                    phase "load"
    serving metrics <- learner.evaluate()                    phase "evaluate_serving"
    learner.train()                                          phase "train"
    candidate metrics <- learner.evaluate()                  phase "evaluate_candidate"
    serving metrics += learner.paired_serving_metrics()      (measured beside the candidate)
    decision <- learner.gate(candidate, serving)             phase "gate"
    publish learner.publication() (metrics in the manifest)  phase "publish"
    keep the optimizers of a published candidate (their moments belong to its weights)

A learner (trainer/learners.py) holds the round's data and models between its steps; the math lives in
the objectives' modules (annotation_round, reward_model, dpo, generation_rl, ppo, sft, ...). The
bookkeeping around a round (back-off, rounds.jsonl, checkpoints) is trainer/loop.py's.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from loopserve.errors import FailedPrecondition, VerificationError
from loopserve.models.encoder_heads import AnnotatorModel
from loopserve.models.staging import publish_staged
from loopserve.models.store import ModelStore
from trainer import annotation_head, checkpoint
from trainer.config import TrainerArgs
from trainer.consumer import TrainerState
from trainer.gate import GateDecision, LossGuard
from trainer.generation_rl import RewardFn
from trainer.optim import load_optimizer

logger = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What one round did; appended to <data-dir>/trainer/rounds.jsonl (numbers and ids only)."""

    model: str
    result: str
    """published | gated | aborted (diverged) | failed (an error) | skipped (not enough data) |
    deferred (reward service down)"""
    round: int = 0
    serving: str | None = None
    version: str | None = None
    """The version published (None unless result == "published")."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Candidate: held-out evaluation and training losses."""
    serving_metrics: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds per phase of the round (load, evaluate serving, train, evaluate candidate, gate, publish)."""
    cursor: int = 0
    """The log position the round's data was read up to (every event with seq <= cursor): an app that
    submitted feedback can tell from the seq its Submit returned whether a round saw it."""


RoundOutput = tuple[RoundResult, dict[str, torch.optim.Optimizer]]


@dataclass
class Context:
    """What the rounds share: configuration, store, RNGs, the reward function and its back-off."""

    args: TrainerArgs
    store: ModelStore
    device: torch.device
    reward_fn: RewardFn | None
    py_rng: random.Random
    gen: torch.Generator
    checkpoint_folder: Path | None = None
    generator_retry_at: float = 0.0
    reward_failures: int = 0
    stop: threading.Event | None = None
    """Set on SIGTERM: training loops end the round at their next step (RoundInterrupted)."""
    head_model: tuple[str, AnnotatorModel, Any] | None = None
    """Online tier: the serving annotator it last loaded (version, model, tokenizer)."""
    embeddings: annotation_head.EmbeddingCache = field(default_factory=annotation_head.EmbeddingCache)

    def guard(self, objective: str) -> LossGuard:
        return LossGuard(objective, self.args.gate, self.stop)


class Skip(Exception):
    """Not enough data for a round; the message is the reason recorded (counts only, no user text)."""


@dataclass
class Publication:
    """How a gated-in candidate becomes a store version."""

    save: Callable[[Path], list[str] | None]
    """Writes the candidate's files into a fresh folder; returns the files to take unchanged from the
    serving version instead (a head-only version shares its encoder), if any."""
    meta: dict[str, object]
    """Manifest meta beside the round's own (trainer_round, cursor)."""
    extra_metrics: dict[str, float] = field(default_factory=dict)
    """Manifest metrics beside the candidate's and the serving version's (prefixed `serving_`)."""
    if_latest: str | None = None
    """Publish only if LATEST is still this version; else the round counts as gated."""


class Learner(Protocol):
    """One model's round, step by step. `evaluate` is called on the serving weights before `train` and
    on the candidate after it; a learner whose training already yields out-of-fold evidence may return
    it from the second call and nothing from the first."""

    model: str
    """The store's model: annotator | reward | generator."""
    name: str
    """The round's name in rounds.jsonl and the metrics (annotator_head for the online tier)."""

    def select(self, ctx: Context, state: TrainerState, serving: str) -> None:
        """Pick the round's data from the state; raise Skip when there is not enough."""

    def load(self, ctx: Context, serving: str) -> None: ...

    def evaluate(self, ctx: Context) -> dict[str, float]: ...

    def train(self, ctx: Context, state: TrainerState, serving: str) -> dict[str, float]:
        """Train the candidate in place; the training metrics (prefixed `train_...`)."""

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Per objective, the optimizer state worth keeping with a published candidate."""

    def paired_serving_metrics(self) -> dict[str, float]:
        """The serving version's figures that exist only beside the candidate's: cross-fitted or paired
        evaluations on the same items, off-policy values on the same logged answers."""

    def gate(self, ctx: Context, candidate: dict[str, float], serving: dict[str, float]) -> GateDecision: ...

    def publication(self, ctx: Context) -> Publication: ...


def run_learner(ctx: Context, state: TrainerState, learner: Learner) -> RoundOutput:
    """The skeleton (module docstring). Exceptions propagate: trainer.loop.run_round records them."""
    serving = ctx.store.latest(learner.model)
    result = RoundResult(learner.name, "skipped", round=state.round, serving=serving)
    if serving is None:
        result.reasons.append(f"no {learner.model} in the store")
        return result, {}
    try:
        learner.select(ctx, state, serving)
    except Skip as e:
        result.reasons.append(str(e))
        return result, {}
    clock = PhaseClock(result.phases)
    learner.load(ctx, serving)
    clock.lap("load")
    result.serving_metrics = learner.evaluate(ctx)
    clock.lap("evaluate_serving")
    train_metrics = learner.train(ctx, state, serving)
    clock.lap("train")
    candidate = learner.evaluate(ctx)
    clock.lap("evaluate_candidate")
    result.metrics = {**candidate, **train_metrics}
    result.serving_metrics.update(learner.paired_serving_metrics())
    decision = learner.gate(ctx, result.metrics, result.serving_metrics)
    clock.lap("gate")
    if not decision.publish:
        result.result, result.reasons = "gated", decision.reasons
        return result, {}
    publication = learner.publication(ctx)
    try:
        result.version = publish(ctx, state, learner.model, serving, publication, result)
    except FailedPrecondition as e:
        if publication.if_latest is None:
            raise
        result.result, result.reasons = "gated", [str(e)]  # LATEST moved: the next round builds on it
        return result, {}
    except VerificationError as e:  # a service refused the candidate while staging it: withdrawn
        result.result, result.reasons = "gated", [str(e)]
        return result, {}
    clock.lap("publish")
    result.result = "published"
    kept: dict[str, torch.optim.Optimizer] = {}
    for objective, opt in learner.optimizers().items():
        if objective in ctx.args.optimizer_objectives():
            state.optimizer_versions[objective] = result.version
            kept[objective] = opt
    return result, kept


# ---- helpers the learners share ------------------------------------------------------------------


def finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


def prefixed(prefix: str, metrics: Mapping[str, float]) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in metrics.items()}


def resume_optimizer(
    ctx: Context, state: TrainerState, objective: str, opt: torch.optim.Optimizer, serving: str
) -> None:
    """Resume Adam's moments only when they belong to the weights this round starts from."""
    if state.optimizer_versions.get(objective) != serving or ctx.checkpoint_folder is None:
        return
    if load_optimizer(opt, ctx.checkpoint_folder / checkpoint.OPTIM_DIR, objective):
        logger.info("%s: resumed optimizer state of %s", objective, serving)


def publish(ctx: Context, state: TrainerState, model: str, serving: str, pub: Publication, result: RoundResult) -> str:
    metrics = {**result.metrics, **prefixed("serving_", result.serving_metrics), **pub.extra_metrics}
    ctx.args.trainer_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-publish-", dir=ctx.args.trainer_dir) as tmp:
        shared = pub.save(Path(tmp)) or []
        # Two phases (loopserve/models/staging.py): the services load and check the version before
        # LATEST moves, so the publish is answered by it within a batch.
        manifest, staging = publish_staged(
            ctx.store,
            model,
            tmp,
            stage_wait_s=ctx.args.stage_wait_s,
            if_latest=pub.if_latest,
            stop=ctx.stop,
            parent=serving,
            metrics=finite(metrics),
            meta={"trainer_round": state.round, "cursor": state.cursor, **pub.meta},
            shared_files=shared,
        )
    if staging is not None:
        result.metrics.update(staging.as_metrics())
    return manifest.version


class PhaseClock:
    """Writes the seconds since the previous lap into `phases` under each lap's name."""

    def __init__(self, phases: dict[str, float]) -> None:
        self.phases, self.t = phases, time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.phases[name] = round(now - self.t, 2)
        self.t = now
