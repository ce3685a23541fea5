"""The trainer process: tail the feedback log, run a learning round per model when it is due, gate,
publish, checkpoint.

    state <- checkpoint (or empty)
    loop:
        records <- log.read(after_seq = state.cursor)        # trainer.consumer.ingest folds them in
        when caught up, for each model whose round is due:   # enough new relevant events, or time
            run its learner through the one round skeleton   # trainer.rounds: load, evaluate serving,
                                                             # train, evaluate candidate, gate, publish
            record the round (rounds.jsonl, metrics); checkpoint (cursor, buffers, optimizer state, RNG)
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
import json
import logging
import random
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict

import torch

from loopserve.annotation.round_requests import clear_round_request, pending_rounds
from loopserve.device import pick_device
from loopserve.feedback_log import open_feedback_log
from loopserve.metrics import PUBLISH, ROUND_SECONDS, TRAINER_LAG
from loopserve.models.encoder_heads import HeadSpec
from loopserve.models.store import ModelStore
from trainer import checkpoint
from trainer.config import TrainerArgs
from trainer.consumer import (
    ANNOTATOR,
    ANNOTATOR_HEAD,
    GENERATOR,
    ITEM_BUFFER,
    REWARD,
    LabelSpace,
    TrainerState,
    ingest,
)
from trainer.gate import RoundAborted, RoundInterrupted
from trainer.generation_rl import RewardFn, RewardUnavailable
from trainer.learners import AnnotatorHeadLearner, AnnotatorLearner, GeneratorLearner, RewardLearner
from trainer.rounds import Context, Learner, RoundOutput, RoundResult, finite, run_learner

logger = logging.getLogger(__name__)

ROUNDS_FILE = "rounds.jsonl"

__all__ = ["Context", "RoundResult", "due", "label_space", "read_rounds", "run_round", "run_trainer"]


# ---- the rounds: one skeleton (trainer/rounds.py), one learner per model (trainer/learners.py) ------

LEARNERS: dict[str, Callable[[], Learner]] = {
    ANNOTATOR: AnnotatorLearner,
    ANNOTATOR_HEAD: AnnotatorHeadLearner,
    REWARD: RewardLearner,
    GENERATOR: GeneratorLearner,
}


def label_space(store: ModelStore) -> LabelSpace:
    """The serving annotator's task and labels (nothing when there is no annotator)."""
    version = store.latest(ANNOTATOR)
    if version is None:
        return LabelSpace("", ())
    spec = HeadSpec.read(store.path(ANNOTATOR, version))
    return LabelSpace(spec.task, tuple(spec.label_names))


# ---- scheduling ----------------------------------------------------------------------------------


def due(ctx: Context, state: TrainerState, model: str, now: float) -> bool:
    """Enough new relevant events, or enough time with at least one (or, for GRPO, with prompts); for a full
    round under `rounds_on_request`, never (the loop runs requested rounds whether due or not)."""
    args = ctx.args
    if model == GENERATOR and now < ctx.generator_retry_at:
        return False
    new = state.new_events[model]
    if model == ANNOTATOR_HEAD:
        return new >= args.head_round_labels
    if args.rounds_on_request:
        return False
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
    cursor = state.cursor  # the loop reads no events while a round runs: this is what the round saw
    try:
        try:
            result, optimizers = run_learner(ctx, state, LEARNERS[model]())
        finally:
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    except RoundAborted as e:
        result, optimizers = RoundResult(model, "aborted", round=state.round, reasons=[str(e)]), {}
    except RoundInterrupted as e:
        # Nothing is published and the trigger is kept, so the round runs again after a restart.
        state.round -= 1
        result = RoundResult(model, "interrupted", reasons=[str(e)], seconds=time.monotonic() - t0, cursor=cursor)
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
        result = RoundResult(model, "deferred", reasons=[str(e)], seconds=time.monotonic() - t0, cursor=cursor)
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
    result.cursor = cursor
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
    row["metrics"], row["serving_metrics"] = finite(result.metrics), finite(result.serving_metrics)
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

        self_training = args.annotator.pseudo_label_ratio > 0 and ANNOTATOR in args.model_list()
        while not stop.is_set():
            records = log.read(state.cursor, args.read_batch)
            if records:
                ingest(
                    state,
                    records,
                    label_space(store),
                    max_buffer=args.max_buffer,
                    exclude_clients=args.excluded_clients(),
                    # Items are pooled only for the annotator's self-training, so a trainer without it (off,
                    # or one that trains other models, such as the online tier's) costs no memory or checkpoint.
                    pool_items=ITEM_BUFFER if self_training else 0,
                )
                dirty = True
            TRAINER_LAG.set(max(log.max_seq() - state.cursor, 0))
            caught_up = len(records) < args.read_batch
            if not caught_up:
                if time.monotonic() - last_save >= args.checkpoint_interval_s:
                    save()
                continue  # drain the backlog before training on it
            requested = pending_rounds(
                root
            )  # "Start training" in Label Studio (loopserve/annotation/round_requests.py)
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
