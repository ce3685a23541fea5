"""The trainer process: tail the feedback log, run a learning round per model when it is due, gate,
publish, checkpoint.

    state <- checkpoint (or empty)
    loop:
        records <- log.read(after_seq = state.cursor)        # trainer.consumer.ingest folds them in
        when caught up, for each model whose round is due:   # enough new relevant events, or time
            load the serving version; evaluate it on the held-out slice
            train it in place (the candidate); evaluate the candidate on the same slice
            gate; publish (ModelStore.publish_version, metrics in the manifest) or record as gated
            checkpoint (cursor, buffers, optimizer state, RNG) atomically
        sleep while the log is idle

The services see a publish through the store's LATEST (their watch) and hot-swap. A round that
diverges (RoundAborted) publishes nothing. When the reward service is down the generator's round is
deferred with exponential back-off while the annotator and reward model keep learning. SIGTERM ends a
running round at its next optimizer step (RoundInterrupted): nothing is published, the round's trigger
is kept so it runs again after a restart, and the state is checkpointed.

Logs carry ids, counts, versions and durations only, never user text.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import random
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from loopserve.device import pick_device
from loopserve.errors import FailedPrecondition, VerificationError
from loopserve.feedback_log import open_feedback_log
from loopserve.metrics import PUBLISH, ROUND_SECONDS, TRAINER_LAG, TRAINER_LOSS
from loopserve.model_store import ModelStore
from loopserve.models import encoder_heads, generator
from loopserve.models.encoder_heads import AnnotatorModel, HeadSpec, RewardModel
from loopserve.round_requests import clear_round_request, pending_rounds
from reward_service.types import STATS_KEY
from trainer import (
    annotation_head,
    annotation_policy,
    annotation_round,
    checkpoint,
    dpo,
    generation_rl,
    off_policy,
    ppo,
    reward_model,
    sft,
)
from trainer.annotation_policy import AnnotationPolicyConfig
from trainer.annotation_round import AnnotatorCandidate
from trainer.causal_lm import add_lora, merge_lora
from trainer.config import TrainerArgs
from trainer.consumer import ANNOTATOR, ANNOTATOR_HEAD, GENERATOR, REWARD, LabelSpace, TrainerState, ingest
from trainer.examples import Demonstration, LabelOutcome, LoggedCompletion, heldout
from trainer.gate import (
    GateConfig,
    GateDecision,
    LossGuard,
    RoundAborted,
    RoundInterrupted,
    gate_generator,
    gate_off_policy,
    gate_reward_model,
    gate_sft,
    paired_counts,
)
from trainer.generation_rl import RewardFn, RewardUnavailable
from trainer.optim import load_optimizer

logger = logging.getLogger(__name__)

ROUNDS_FILE = "rounds.jsonl"
PROBE_PAIR = ("Is the reward service up?", "Yes.")


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
    """Seconds per phase of the round (load, evaluate serving, train, evaluate candidate, publish)."""


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


# ---- helpers shared by the rounds ----------------------------------------------------------------


def label_space(store: ModelStore) -> LabelSpace:
    """The serving annotator's task and labels (nothing when there is no annotator)."""
    version = store.latest(ANNOTATOR)
    if version is None:
        return LabelSpace("", ())
    spec = HeadSpec.read(store.path(ANNOTATOR, version))
    return LabelSpace(spec.task, tuple(spec.label_names))


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


def _maybe_load_optimizer(
    ctx: Context, state: TrainerState, objective: str, opt: torch.optim.Optimizer, serving: str
) -> None:
    """Resume Adam's moments only when they belong to the weights this round starts from."""
    if state.optimizer_versions.get(objective) != serving or ctx.checkpoint_folder is None:
        return
    if load_optimizer(opt, ctx.checkpoint_folder / checkpoint.OPTIM_DIR, objective):
        logger.info("%s: resumed optimizer state of %s", objective, serving)


def _publish(
    ctx: Context,
    state: TrainerState,
    model: str,
    save: Callable[[Path], None],
    serving: str,
    metrics: dict[str, float],
    meta: dict[str, object],
) -> str:
    ctx.args.trainer_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-publish-", dir=ctx.args.trainer_dir) as tmp:
        save(Path(tmp))
        manifest = ctx.store.publish_version(
            model,
            tmp,
            parent=serving,
            metrics=_finite(metrics),
            meta={"trainer_round": state.round, "cursor": state.cursor, **meta},
        )
    return manifest.version


def _keep_optimizer(
    ctx: Context, state: TrainerState, objective: str, opt: torch.optim.Optimizer, version: str
) -> dict[str, torch.optim.Optimizer]:
    if objective not in ctx.args.optimizer_objectives():
        return {}
    state.optimizer_versions[objective] = version
    return {objective: opt}


class _PhaseClock:
    """Writes the seconds since the previous lap into `phases` under each lap's name."""

    def __init__(self, phases: dict[str, float]) -> None:
        self.phases, self.t = phases, time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.phases[name] = round(now - self.t, 2)
        self.t = now


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in metrics.items()}


# ---- one round per model -------------------------------------------------------------------------

RoundOutput = tuple[RoundResult, dict[str, torch.optim.Optimizer]]


def annotator_round(ctx: Context, state: TrainerState) -> RoundOutput:
    """Few verified labels: cross-fitted round from the zero-shot base; many: held-out round on top of the
    serving weights (trainer.annotation_round says why)."""
    args, cfg = ctx.args, ctx.args.annotator
    serving = ctx.store.latest(ANNOTATOR)
    if serving is None:
        return RoundResult(ANNOTATOR, "skipped", reasons=["no annotator in the store"]), {}
    folder = ctx.store.path(ANNOTATOR, serving)
    spec = HeadSpec.read(folder)
    known = set(spec.label_names)
    items = [x for x in state.labels.values() if x.label in known]
    result = RoundResult(ANNOTATOR, "skipped", round=state.round, serving=serving)
    clock = _PhaseClock(result.phases)
    few = len(items) < args.gate.cv_max_items and args.gate.cv_folds >= 2
    if few and len(items) < args.gate.min_cv_items:
        result.reasons.append(f"{len(items)} verified labels, need {args.gate.min_cv_items}")
        return result, {}
    evals = [x for x in items if heldout(x.text, args.heldout_fraction)]
    train = [x for x in items if not heldout(x.text, args.heldout_fraction)]
    rejects = [x for x in state.bandit if x.label in known and not heldout(x.text, args.heldout_fraction)]
    if not few and len(evals) < args.gate.min_eval_items:
        result.reasons.append(f"held-out slice has {len(evals)} items, need {args.gate.min_eval_items}")
        return result, {}
    if not few and not train and not rejects:
        result.reasons.append("no training items")
        return result, {}
    tokenizer = encoder_heads.load_tokenizer(folder)
    model = encoder_heads.load(folder, ctx.device)  # the serving version
    if not isinstance(model, AnnotatorModel):
        raise VerificationError(f"annotator {serving} has no annotator head")
    clock.lap("load")
    logged = off_policy.held_out_outcomes(
        list(state.outcomes.values()), spec.label_names, args.heldout_fraction, args.gate.ope_max_items
    )
    serving_probs = _label_probs(model, tokenizer, logged, cfg)  # before a held-out round trains `model`
    opt: torch.optim.Optimizer | None = None
    if few:
        base_version = ctx.store.list(ANNOTATOR)[0]
        base_folder = ctx.store.path(ANNOTATOR, base_version)
        if HeadSpec.read(base_folder).label_names != spec.label_names:
            base_folder = folder  # the label set changed since v0: the serving version is the prior

        def load_base() -> AnnotatorModel:
            base = encoder_heads.load(base_folder, ctx.device)
            assert isinstance(base, AnnotatorModel)
            return base

        serving_meta = ctx.store.get(ANNOTATOR, serving).meta
        cand = annotation_round.cross_fit_round(
            load_base,
            model,
            tokenizer,
            items,
            int(serving_meta.get("cursor", 0)),
            cfg,
            args.gate,
            serving_checked=bool(serving_meta.get("checked")),
            generator=ctx.gen,
            guard=ctx.guard(ANNOTATOR),
        )
    else:
        opt = annotation_policy.make_optimizer(model, cfg)
        _maybe_load_optimizer(ctx, state, ANNOTATOR, opt, serving)
        cand = annotation_round.held_out_round(
            model, tokenizer, train, rejects, evals, cfg, args.gate,
            baseline=state.baseline, optimizer=opt, generator=ctx.gen, guard=ctx.guard(ANNOTATOR),
        )  # fmt: skip
    clock.lap("train_and_evaluate")
    _annotator_off_policy(cand, logged, spec.label_names, serving_probs, tokenizer, cfg, args.gate)
    clock.lap("off_policy")
    TRAINER_LOSS.labels(objective=ANNOTATOR).set(cand.train_metrics.get("loss", float("nan")))
    result.metrics = {**cand.metrics, **_prefixed("train_", cand.train_metrics)}
    result.serving_metrics = cand.serving_metrics
    if not cand.decision.publish:
        result.result, result.reasons = "gated", cand.decision.reasons
        return result, {}
    result.version = _publish(
        ctx,
        state,
        ANNOTATOR,
        lambda dest: encoder_heads.save(cand.model, tokenizer, dest),
        serving,
        {**result.metrics, **_prefixed("serving_", result.serving_metrics)},
        {
            "objective": "annotation_policy",
            "task": spec.task,
            "labels": spec.label_names,
            # Passed the gate's bar for auto-labelling, calibrated on items it was not trained on: the
            # policy service lets a checked version auto-label (an unchecked one flags every item).
            "checked": cand.decision.checked,
            "evidence": cand.regime,
        },
    )
    clock.lap("publish")
    result.result = "published"
    if opt is None:
        return result, {}
    return result, _keep_optimizer(ctx, state, ANNOTATOR, opt, result.version)


def _label_probs(
    model: AnnotatorModel, tokenizer: Any, logged: list[LabelOutcome], cfg: AnnotationPolicyConfig
) -> torch.Tensor:
    """(n, L) the served probabilities of `model` on the logged texts."""
    return annotation_policy.predict_logits(model, tokenizer, [o.text for o in logged], cfg).softmax(-1)


def _annotator_off_policy(
    cand: AnnotatorCandidate,
    logged: list[LabelOutcome],
    labels: list[str],
    serving_probs: torch.Tensor,
    tokenizer: Any,
    cfg: AnnotationPolicyConfig,
    gate: GateConfig,
) -> None:
    """Off-policy value of the candidate and of serving on the logged outcomes, into the candidate's
    metrics (round record and manifest); the off-policy gate joins the candidate's decision. A
    cross-fitted candidate was trained on every verified label, held-out texts included: its figures are
    in-sample (`ope_in_sample`), so the gate does not read them."""
    if not logged:
        return
    cand_probs = _label_probs(cand.model, tokenizer, logged, cfg)
    c, s = off_policy.annotator_estimates(logged, labels, serving_probs, cand_probs, gate.ope_max_weight or math.inf)
    in_sample = cand.regime == "cross-fit"
    cand.metrics.update({**c, "ope_in_sample": float(in_sample)})
    cand.serving_metrics.update(s)
    if in_sample:
        return
    verdict = gate_off_policy(c, s, gate)
    if not verdict.publish:
        cand.decision = GateDecision(False, cand.decision.reasons + verdict.reasons, checked=False)


def annotator_head_round(ctx: Context, state: TrainerState) -> RoundOutput:
    """The online tier (trainer.annotation_head): a new head on the serving encoder, gated by
    cross-validation, published as a version sharing the encoder's weights, only if LATEST did not move."""
    args = ctx.args
    serving = ctx.store.latest(ANNOTATOR)
    result = RoundResult(ANNOTATOR_HEAD, "skipped", round=state.round, serving=serving)
    if serving is None:
        result.reasons.append("no annotator in the store")
        return result, {}
    folder = ctx.store.path(ANNOTATOR, serving)
    manifest = ctx.store.get(ANNOTATOR, serving)
    spec = HeadSpec.read(folder)
    items = [x for x in state.labels.values() if x.label in set(spec.label_names)]
    if len(items) < args.gate.min_cv_items:
        result.reasons.append(f"{len(items)} verified labels, need {args.gate.min_cv_items}")
        return result, {}
    clock = _PhaseClock(result.phases)
    if ctx.head_model is None or ctx.head_model[0] != serving:
        model = encoder_heads.load(folder, ctx.device)
        if not isinstance(model, AnnotatorModel):
            raise VerificationError(f"annotator {serving} has no annotator head")
        ctx.head_model = (serving, model, encoder_heads.load_tokenizer(folder))
    _, model, tokenizer = ctx.head_model
    # The encoder weights' digest keys the cache: a head-only version shares it with its parent.
    key = manifest.files.get(encoder_heads.WEIGHTS_FILE, serving)
    emb = ctx.embeddings.embed(model, tokenizer, [x.text for x in items], key, args.head, args.annotator.max_length)
    clock.lap("embed")
    cursor = int(manifest.meta.get("cursor", 0))
    cand = annotation_head.head_round(
        model, emb, items, cursor, args.head, args.gate, serving_checked=bool(manifest.meta.get("checked"))
    )
    clock.lap("fit_and_cross_validate")
    result.metrics, result.serving_metrics = cand.metrics, cand.serving_metrics
    if not cand.decision.publish:
        result.result, result.reasons = "gated", cand.decision.reasons
        return result, {}
    new = copy.deepcopy(model.head)
    new.weight.data.copy_(cand.weight)
    new.bias.data.copy_(cand.bias)
    new_spec = dataclasses.replace(spec, temperature=cand.temperature)
    args.trainer_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix=".tmp-publish-", dir=args.trainer_dir) as tmp:
            shared = encoder_heads.save_head(new, new_spec, tmp, folder)
            published = ctx.store.publish_version(
                ANNOTATOR,
                tmp,
                parent=serving,
                metrics=_finite({**cand.metrics, **_prefixed("serving_", cand.serving_metrics)}),
                meta={
                    "trainer_round": state.round,
                    "cursor": state.cursor,
                    "objective": "annotation_head",
                    "task": spec.task,
                    "labels": spec.label_names,
                    "checked": cand.decision.checked,
                    "evidence": "head cross-validation",
                },
                shared_files=shared,
                if_latest=serving,
            )
    except FailedPrecondition as e:  # a full round published meanwhile: the next head round builds on it
        result.result, result.reasons = "gated", [str(e)]
        return result, {}
    clock.lap("publish")
    result.result, result.version = "published", published.version
    return result, {}


def reward_round(ctx: Context, state: TrainerState) -> RoundOutput:
    args, cfg = ctx.args, ctx.args.reward
    serving = ctx.store.latest(REWARD)
    if serving is None:
        return RoundResult(REWARD, "skipped", reasons=["no reward model in the store"]), {}
    frac = args.heldout_fraction

    def split(xs: list[Any]) -> tuple[list[Any], list[Any]]:
        return [x for x in xs if not heldout(x.prompt, frac)], [x for x in xs if heldout(x.prompt, frac)]

    (pairs, eval_pairs), (ratings, eval_ratings) = split(state.pairs), split(state.ratings)
    pointwise, eval_pointwise = split(state.pointwise)
    result = RoundResult(REWARD, "skipped", round=state.round, serving=serving)
    if len(eval_pairs) < args.gate.min_eval_pairs:
        result.reasons.append(f"held-out slice has {len(eval_pairs)} pairs, need {args.gate.min_eval_pairs}")
        return result, {}
    clock = _PhaseClock(result.phases)
    folder = ctx.store.path(REWARD, serving)
    tokenizer = encoder_heads.load_tokenizer(folder)
    model = encoder_heads.load(folder, ctx.device)
    if not isinstance(model, RewardModel):
        raise VerificationError(f"reward model {serving} has no reward head")
    clock.lap("load")
    evaluate = reward_model.evaluate_reward_model
    result.serving_metrics = evaluate(model, tokenizer, eval_pairs, eval_ratings, eval_pointwise, cfg)
    serving_correct = reward_model.pairwise_scores(model, tokenizer, eval_pairs, cfg) > 0.5
    clock.lap("evaluate_serving")
    opt = reward_model.make_optimizer(model, cfg)
    _maybe_load_optimizer(ctx, state, REWARD, opt, serving)
    train_metrics = reward_model.train_reward_model(
        model,
        tokenizer,
        pairs,
        ratings,
        pointwise,
        cfg,
        optimizer=opt,
        guard=ctx.guard(REWARD),
        generator=ctx.gen,
    )
    TRAINER_LOSS.labels(objective=REWARD).set(train_metrics.get("loss", float("nan")))
    clock.lap("train")
    cand = evaluate(model, tokenizer, eval_pairs, eval_ratings, eval_pointwise, cfg)
    cand.update(paired_counts(serving_correct, reward_model.pairwise_scores(model, tokenizer, eval_pairs, cfg) > 0.5))
    clock.lap("evaluate_candidate")
    cand.update(_prefixed("train_", train_metrics), n_train_pairs=float(len(pairs)))
    result.metrics = cand
    decision = gate_reward_model(cand, result.serving_metrics, args.gate)
    if not decision.publish:
        result.result, result.reasons = "gated", decision.reasons
        return result, {}
    # The version's normalisation statistics, on held-out responses (reward_model.reference_pairs).
    reference = reward_model.reference_pairs(eval_pairs, eval_ratings, eval_pointwise, cfg.stats_reference_size)
    stats = reward_model.reward_statistics(model, tokenizer, reference, cfg)
    result.version = _publish(
        ctx,
        state,
        REWARD,
        lambda dest: encoder_heads.save(model, tokenizer, dest),
        serving,
        {**cand, **_prefixed("serving_", result.serving_metrics), "reward_mean": stats.mean, "reward_std": stats.std},
        {"objective": "reward_model", STATS_KEY: stats.to_meta()},
    )
    result.result = "published"
    return result, _keep_optimizer(ctx, state, REWARD, opt, result.version)


def _eval_prompts(state: TrainerState, args: TrainerArgs) -> tuple[list[str], list[str]]:
    """(train prompts, a fixed held-out subset): the subset is the first `max_eval_prompts` held-out
    prompts in arrival order, so it stays the same from round to round once full."""
    train: list[str] = []
    evals: list[str] = []
    for prompt in state.prompts:
        (evals if heldout(prompt, args.heldout_fraction) else train).append(prompt)
    return train, evals[: args.max_eval_prompts]


def generator_round(ctx: Context, state: TrainerState) -> RoundOutput:
    args = ctx.args
    serving = ctx.store.latest(GENERATOR)
    result = RoundResult(GENERATOR, "skipped", round=state.round, serving=serving)
    if serving is None:
        result.reasons.append("no generator in the store")
        return result, {}
    objectives = args.generator_objective_list()
    # SFT needs demonstrations and no reward service; the others need the reward service for the gate.
    train_demos = [d for d in state.demonstrations if not heldout(d.prompt, args.heldout_fraction)]
    eval_demos = [d for d in state.demonstrations if heldout(d.prompt, args.heldout_fraction)]
    run_sft = "sft" in objectives and bool(train_demos) and len(eval_demos) >= args.gate.min_eval_demos
    rl_listed = [o for o in objectives if o != "sft"]
    if not rl_listed:
        if not run_sft:
            result.reasons.append(
                f"SFT needs demonstrations: {len(train_demos)} to train on, {len(eval_demos)} held out "
                f"(need {args.gate.min_eval_demos})"
            )
            return result, {}
        return _sft_round(ctx, state, result, serving, train_demos, eval_demos)
    if ctx.reward_fn is None:
        result.reasons.append("no reward function configured")
        return result, {}
    train_prompts, eval_prompts = _eval_prompts(state, args)
    train_pairs = [p for p in state.pairs if not heldout(p.prompt, args.heldout_fraction)]
    eval_pairs = [p for p in state.pairs if heldout(p.prompt, args.heldout_fraction)]
    if len(eval_prompts) < args.gate.min_eval_prompts:
        result.reasons.append(f"held-out slice has {len(eval_prompts)} prompts, need {args.gate.min_eval_prompts}")
        return result, {}
    run_dpo = "dpo" in objectives and bool(train_pairs)
    run_grpo = "grpo" in objectives and bool(train_prompts)
    run_ppo = "ppo" in objectives and bool(train_prompts)
    if not (run_dpo or run_grpo or run_ppo):
        result.reasons.append("no training data for the generator objectives")
        return result, {}
    # Probe the reward service before loading two copies of the generator (a fixed pair, no user text).
    generation_rl.score(ctx.reward_fn, [PROBE_PAIR[0]], [PROBE_PAIR[1]])
    clock = _PhaseClock(result.phases)
    ref_version = args.generator_ref_version or reference_version(ctx.store)
    folder = ctx.store.path(GENERATOR, serving)
    tokenizer = generator.load_tokenizer(folder)
    ref = generator.load(ctx.store.path(GENERATOR, ref_version), ctx.device).requires_grad_(False)
    policy = generator.load(folder, ctx.device)
    clock.lap("load")
    result.serving_metrics = generation_rl.evaluate_policy(
        policy, ref, tokenizer, eval_prompts, ctx.reward_fn, args.grpo
    )
    if run_sft:
        result.serving_metrics.update(sft.evaluate_sft(policy, tokenizer, eval_demos, args.sft))
    if eval_pairs and run_dpo:  # DPO's implicit-reward metrics cost two forward passes per pair
        result.serving_metrics.update(dpo.evaluate_dpo(policy, ref, tokenizer, eval_pairs, args.dpo))
    logged = off_policy.held_out_completions(
        state.completions, serving, args.heldout_fraction, args.gate.ope_max_completions
    )
    serving_logp = off_policy.completion_logprobs(policy, tokenizer, logged, args.grpo)
    clock.lap("evaluate_serving")
    policy = add_lora(policy, args.lora)
    optimizers: dict[str, torch.optim.Optimizer] = {}
    train_metrics: dict[str, float] = {}
    if run_sft:
        opt = sft.make_optimizer(policy, args.sft)
        guard = ctx.guard("sft")
        m = sft.train_sft(policy, tokenizer, train_demos, args.sft, optimizer=opt, guard=guard, generator=ctx.gen)
        TRAINER_LOSS.labels(objective="sft").set(m.get("sft_loss", float("nan")))
        train_metrics.update(_prefixed("train_", m))
        optimizers["sft"] = opt
    if run_dpo:
        opt = dpo.make_optimizer(policy, args.dpo)
        if args.lora.r == 0:
            _maybe_load_optimizer(ctx, state, "dpo", opt, serving)
        m = dpo.train_dpo(
            policy,
            ref,
            tokenizer,
            train_pairs,
            args.dpo,
            optimizer=opt,
            guard=ctx.guard("dpo"),
            generator=ctx.gen,
        )
        TRAINER_LOSS.labels(objective="dpo").set(m.get("dpo_loss", float("nan")))
        train_metrics.update(_prefixed("train_", m))
        optimizers["dpo"] = opt
    if run_grpo:
        opt = generation_rl.make_optimizer(policy, args.grpo)
        if args.lora.r == 0:
            _maybe_load_optimizer(ctx, state, "grpo", opt, serving)
        m = generation_rl.train_grpo(
            policy,
            ref,
            tokenizer,
            train_prompts,
            ctx.reward_fn,
            args.grpo,
            optimizer=opt,
            guard=ctx.guard("grpo"),
            rng=ctx.py_rng,
        )
        TRAINER_LOSS.labels(objective="grpo").set(m.get("loss", float("nan")))
        train_metrics.update(_prefixed("train_grpo_", m))
        optimizers["grpo"] = opt
    if run_ppo:  # a fresh value head each round (module docstring), so no optimizer state to resume
        value_head = ppo.value_head_for(policy)
        opt = ppo.make_optimizer(policy, value_head, args.ppo)
        m = ppo.train_ppo(
            policy,
            ref,
            tokenizer,
            train_prompts,
            ctx.reward_fn,
            args.ppo,
            value_head=value_head,
            optimizer=opt,
            guard=ctx.guard("ppo"),
            rng=ctx.py_rng,
            generator=ctx.gen,
        )
        TRAINER_LOSS.labels(objective="ppo").set(m.get("pg_loss", float("nan")))
        train_metrics.update(_prefixed("train_ppo_", m))
        optimizers["ppo"] = opt
    policy = merge_lora(policy)
    clock.lap("train")
    cand = generation_rl.evaluate_policy(policy, ref, tokenizer, eval_prompts, ctx.reward_fn, args.grpo)
    if eval_pairs and run_dpo:
        cand.update(dpo.evaluate_dpo(policy, ref, tokenizer, eval_pairs, args.dpo))
    if run_sft:
        cand.update(sft.evaluate_sft(policy, tokenizer, eval_demos, args.sft))
    clock.lap("evaluate_candidate")
    cand.update(train_metrics)
    result.metrics = cand
    decision = gate_generator(cand, result.serving_metrics, args.gate)
    if logged:
        ope_verdict = _generator_off_policy(ctx, policy, tokenizer, logged, serving_logp, cand, result.serving_metrics)
        decision = GateDecision(decision.publish and ope_verdict.publish, decision.reasons + ope_verdict.reasons)
        clock.lap("off_policy")
    if run_sft:
        sft_decision = gate_sft(cand, result.serving_metrics, args.gate)
        decision = GateDecision(decision.publish and sft_decision.publish, decision.reasons + sft_decision.reasons)
    if not decision.publish:
        result.result, result.reasons = "gated", decision.reasons
        return result, {}

    def save(dest: Path) -> None:
        policy.save_pretrained(dest, safe_serialization=True)
        tokenizer.save_pretrained(dest)

    result.version = _publish(
        ctx,
        state,
        GENERATOR,
        save,
        serving,
        {**cand, **_prefixed("serving_", result.serving_metrics)},
        {"objective": "+".join(o for o in objectives if o in optimizers), "reference": ref_version},
    )
    result.result = "published"
    kept: dict[str, torch.optim.Optimizer] = {}
    if args.lora.r == 0:  # LoRA adapters are merged and re-created each round: their state has no future
        for objective, opt in optimizers.items():
            if objective != "ppo":  # its value head is not kept either
                kept.update(_keep_optimizer(ctx, state, objective, opt, result.version))
    return result, kept


def _generator_off_policy(
    ctx: Context,
    policy: Any,
    tokenizer: Any,
    logged: list[LoggedCompletion],
    serving_logp: list[float],
    cand: dict[str, float],
    serving_metrics: dict[str, float],
) -> GateDecision:
    """IPS / SNIPS value of the candidate on completions the serving version logged, scored by the reward
    model, into both versions' metrics; the off-policy gate's verdict (trainer.gate.gate_off_policy)."""
    assert ctx.reward_fn is not None
    rewards = generation_rl.score(ctx.reward_fn, [c.prompt for c in logged], [c.response for c in logged]).tolist()
    cand_logp = off_policy.completion_logprobs(policy, tokenizer, logged, ctx.args.grpo)
    cand.update(
        off_policy.generator_estimates(rewards, cand_logp, serving_logp, ctx.args.gate.ope_max_weight or math.inf)
    )
    serving_metrics.update(off_policy.generator_estimates(rewards, serving_logp, serving_logp))  # w = 1: logged mean
    gate = ctx.args.gate
    if gate.ope_estimator == "dr":
        gate = dataclasses.replace(gate, ope_estimator="snips")
    return gate_off_policy(cand, serving_metrics, gate)


def reference_version(store: ModelStore) -> str:
    """pi_ref of the KL terms: the newest generator version an SFT-only round published (InstructGPT
    leashes RL to its SFT model), else the oldest version in the store (the base)."""
    versions = store.list(GENERATOR)
    for version in reversed(versions):
        if store.get(GENERATOR, version).meta.get("objective") == "sft":
            return version
    return versions[0]


def _sft_round(
    ctx: Context,
    state: TrainerState,
    result: RoundResult,
    serving: str,
    train_demos: list[Demonstration],
    eval_demos: list[Demonstration],
) -> RoundOutput:
    """A round of SFT alone: train on the demonstrations, gate on the held-out ones' NLL, publish as
    `objective: sft` (the reference of later RL rounds). Needs no reward service."""
    args = ctx.args
    clock = _PhaseClock(result.phases)
    folder = ctx.store.path(GENERATOR, serving)
    tokenizer = generator.load_tokenizer(folder)
    policy = generator.load(folder, ctx.device)
    clock.lap("load")
    result.serving_metrics = sft.evaluate_sft(policy, tokenizer, eval_demos, args.sft)
    clock.lap("evaluate_serving")
    policy = add_lora(policy, args.lora)
    opt = sft.make_optimizer(policy, args.sft)
    if args.lora.r == 0:
        _maybe_load_optimizer(ctx, state, "sft", opt, serving)
    guard = ctx.guard("sft")
    m = sft.train_sft(policy, tokenizer, train_demos, args.sft, optimizer=opt, guard=guard, generator=ctx.gen)
    TRAINER_LOSS.labels(objective="sft").set(m.get("sft_loss", float("nan")))
    policy = merge_lora(policy)
    clock.lap("train")
    cand = sft.evaluate_sft(policy, tokenizer, eval_demos, args.sft)
    clock.lap("evaluate_candidate")
    cand.update(_prefixed("train_", m), n_train_demos=float(len(train_demos)))
    result.metrics = cand
    decision = gate_sft(cand, result.serving_metrics, args.gate)
    if not decision.publish:
        result.result, result.reasons = "gated", decision.reasons
        return result, {}

    def save(dest: Path) -> None:
        policy.save_pretrained(dest, safe_serialization=True)
        tokenizer.save_pretrained(dest)

    result.version = _publish(
        ctx,
        state,
        GENERATOR,
        save,
        serving,
        {**cand, **_prefixed("serving_", result.serving_metrics)},
        {"objective": "sft"},
    )
    clock.lap("publish")
    result.result = "published"
    kept = _keep_optimizer(ctx, state, "sft", opt, result.version) if args.lora.r == 0 else {}
    return result, kept


ROUNDS: dict[str, Callable[[Context, TrainerState], RoundOutput]] = {
    ANNOTATOR: annotator_round,
    ANNOTATOR_HEAD: annotator_head_round,
    REWARD: reward_round,
    GENERATOR: generator_round,
}


# ---- scheduling ----------------------------------------------------------------------------------


def due(ctx: Context, state: TrainerState, model: str, now: float) -> bool:
    """Enough new relevant events, or enough time with at least one (or, for GRPO, with prompts)."""
    args = ctx.args
    if model == GENERATOR and now < ctx.generator_retry_at:
        return False
    new = state.new_events[model]
    if model == ANNOTATOR_HEAD:
        return new >= args.head_round_labels
    if new >= args.round_min_events:
        return True
    if model == ANNOTATOR and args.annotator_round_growth > 0:
        had = max(len(state.labels) - new, 0)
        if new >= max(args.gate.min_cv_items, args.annotator_round_growth * had) and len(state.labels) >= (
            args.gate.min_cv_items
        ):
            return True
    waited = now - state.last_round_at.get(model, now) >= args.round_interval_s
    online = {"grpo", "ppo"} & set(args.generator_objective_list())
    if model == GENERATOR and online and ctx.reward_fn is not None:
        return waited and bool(state.prompts)
    return waited and new > 0


def run_round(ctx: Context, state: TrainerState, model: str) -> RoundOutput:
    """One round with its bookkeeping: metrics, back-off, rounds.jsonl, and the trigger reset."""
    t0 = time.monotonic()
    state.round += 1
    try:
        try:
            result, optimizers = ROUNDS[model](ctx, state)
        finally:
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    except RoundAborted as e:
        result, optimizers = RoundResult(model, "aborted", round=state.round, reasons=[str(e)]), {}
    except RoundInterrupted as e:
        # Nothing is published and the trigger is kept, so the round runs again after a restart.
        state.round -= 1
        result = RoundResult(model, "interrupted", reasons=[str(e)], seconds=time.monotonic() - t0)
        _record(ctx, result)
        logger.info("%s", e)
        return result, {}
    except RewardUnavailable as e:
        state.round -= 1
        ctx.reward_failures += 1
        wait = min(ctx.args.reward_backoff_s * 2 ** (ctx.reward_failures - 1), ctx.args.reward_backoff_max_s)
        ctx.generator_retry_at = time.time() + wait
        logger.warning(
            "reward service %s unavailable (%s, failure %d): generator round deferred, retry in %.0fs; "
            "other learners continue",
            ctx.args.reward_target,
            e,
            ctx.reward_failures,
            wait,
        )
        result = RoundResult(model, "deferred", reasons=[str(e)], seconds=time.monotonic() - t0)
        _record(ctx, result)
        return result, {}
    except Exception as e:  # a failing learner must not stop the others; no message: it may quote data
        tb = "".join(traceback.format_tb(e.__traceback__))
        logger.error("round %d %s failed with %s at\n%s", state.round, model, type(e).__name__, tb)
        result, optimizers = RoundResult(model, "failed", round=state.round, reasons=[type(e).__name__]), {}
    if model == GENERATOR and result.result != "skipped":
        ctx.reward_failures = 0
    result.round = state.round
    result.seconds = time.monotonic() - t0
    state.new_events[model] = 0
    state.last_round_at[model] = time.time()
    ROUND_SECONDS.labels(objective=model).observe(result.seconds)
    if result.result != "skipped":
        PUBLISH.labels(model=model, result=result.result).inc()
    _record(ctx, result)
    logger.info(
        "round %d %s: %s %s (serving %s) in %.1fs%s",
        result.round,
        model,
        result.result,
        result.version or "",
        result.serving,
        result.seconds,
        f": {'; '.join(result.reasons)}" if result.reasons else "",
    )
    return result, optimizers


def _record(ctx: Context, result: RoundResult) -> None:
    ctx.args.trainer_dir.mkdir(parents=True, exist_ok=True)
    row = asdict(result)
    row["metrics"], row["serving_metrics"] = _finite(result.metrics), _finite(result.serving_metrics)
    row["time"] = time.time()
    with (ctx.args.trainer_dir / ROUNDS_FILE).open("a") as f:
        f.write(json.dumps(row) + "\n")


def read_rounds(args: TrainerArgs) -> list[dict[str, object]]:
    """Every round recorded so far (for the CLI, dashboards and tests)."""
    path = args.trainer_dir / ROUNDS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- the process ---------------------------------------------------------------------------------


def run_trainer(
    args: TrainerArgs, *, reward_fn: RewardFn | None = None, stop: threading.Event | None = None
) -> TrainerState:
    """Run until `stop` is set (or, with `args.once`, until the log is consumed and due rounds ran;
    or after `args.max_rounds` rounds). Returns the final state."""
    stop = stop or threading.Event()
    root = args.trainer_dir
    store = ModelStore(args.store_path)
    with checkpoint.exclusive(root), contextlib.closing(open_feedback_log(args.feedback_log_url)) as log:
        checkpoint.clean_leftovers(root)
        state, folder = checkpoint.load_checkpoint(root)
        ctx = Context(
            args, store, pick_device(args.device), reward_fn, random.Random(args.seed), torch.Generator(), stop=stop
        )
        ctx.checkpoint_folder = folder
        if not checkpoint.restore_rng(state, ctx.py_rng, ctx.gen):
            ctx.gen.manual_seed(args.seed)
            torch.manual_seed(args.seed)
        started = time.time()
        for model in args.model_list():
            state.last_round_at.setdefault(model, started)
        logger.info(
            "trainer starting at cursor %d from %s (%d labels, %d pairs, %d prompts)",
            state.cursor,
            folder.name if folder else "an empty state",
            len(state.labels),
            len(state.pairs),
            len(state.prompts),
        )
        rounds = 0
        dirty = False
        last_save = time.monotonic()

        def save(optimizers: dict[str, torch.optim.Optimizer] | None = None) -> None:
            nonlocal dirty, last_save
            checkpoint.capture_rng(state, ctx.py_rng, ctx.gen)
            ctx.checkpoint_folder = checkpoint.save_checkpoint(root, state, optimizers, keep=args.checkpoint_keep)
            dirty, last_save = False, time.monotonic()

        while not stop.is_set():
            records = log.read(state.cursor, args.read_batch)
            if records:
                ingest(
                    state,
                    records,
                    label_space(store),
                    max_buffer=args.max_buffer,
                    exclude_clients=args.excluded_clients(),
                )
                dirty = True
            TRAINER_LAG.set(max(log.max_seq() - state.cursor, 0))
            caught_up = len(records) < args.read_batch
            if not caught_up:
                if time.monotonic() - last_save >= args.checkpoint_interval_s:
                    save()
                continue  # drain the backlog before training on it
            requested = pending_rounds(root)  # "Start training" in Label Studio (loopserve/round_requests.py)
            for model in args.model_list():
                if stop.is_set() or (args.max_rounds and rounds >= args.max_rounds):
                    break
                if not (due(ctx, state, model, time.time()) or model in requested):
                    continue
                clear_round_request(root, model)
                result, optimizers = run_round(ctx, state, model)
                if result.result == "interrupted":
                    break
                if result.result != "deferred":
                    rounds += result.result != "skipped"
                    save(optimizers)  # with every round, so a published version and its state meet soon
            if dirty and (args.once or time.monotonic() - last_save >= args.checkpoint_interval_s):
                save()
            if args.once or (args.max_rounds and rounds >= args.max_rounds):
                break
            stop.wait(args.poll_interval_s)
        if dirty:
            save()
        logger.info("trainer stopping at cursor %d after %d rounds", state.cursor, rounds)
        return state
