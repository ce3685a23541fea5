"""The log consumer: folds feedback-log records, in seq order, into the trainer's state.

`ingest(state, records, labels)` is a deterministic fold: the state after records 1..n depends only
on those records and the label set, and each record is folded exactly once because the fold advances
`state.cursor` past it (see trainer/checkpoint.py for why this survives a crash).

What each record becomes:

| record                                   | becomes                                                  |
| ---------------------------------------- | -------------------------------------------------------- |
| generation decision                      | a prompt in the RL prompt pool                           |
| label decision                           | its text in the item pool, if self-training is on        |
| accept / correction on a label           | a `LabelExample` in the replay buffer (latest per event) |
| reject on a label                        | a `BanditExample` (reward 0, with the logged propensity) |
| accept / reject on a generation          | a `PointwiseExample` (1 / 0) for the reward model        |
| rating on a generation                   | a `RatingExample`, normalised to [0, 1]                  |
| preference (two event ids, or texts)     | a `PreferencePair` (reward model and DPO)                |
| edit of a generation                     | a `PreferencePair`: the edit preferred over the served,  |
|                                          | and a `Demonstration` (the edit) for SFT                 |
| demonstration decision (model            | a `Demonstration` for SFT (not an RL prompt: it was      |
| "demonstration", `log import --demonstrations`) | never served)                                     |

Feedback that cannot be used is skipped and counted by reason (EVENTS_SKIPPED{reason} and
`state.skipped`): a label outside the annotator's label set, a decision of another task, a missing
join, a reject without a probability propensity, a rating of a label. Every feedback record is
either used or skipped, never both, never neither.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loopserve.feedback_log.demonstrations import DEMONSTRATION_MODEL
from loopserve.feedback_log.records import Decision, Feedback, LogRecord
from loopserve.metrics import EVENTS_SKIPPED
from trainer.examples import (
    BanditExample,
    Demonstration,
    LabelExample,
    LabelOutcome,
    LoggedCompletion,
    PointwiseExample,
    PreferencePair,
    RatingExample,
)

logger = logging.getLogger(__name__)

ANNOTATOR, REWARD, GENERATOR = "annotator", "reward", "generator"
ANNOTATOR_HEAD = "annotator_head"
COMPLETION_BUFFER = 4096
"""Served completions kept for off-policy evaluation: only the latest few hundred of the serving version
are ever read, and every generation decision would otherwise stay in the checkpoint."""
"""The annotator's online tier: head-only updates on cached embeddings (trainer.annotation_head)."""
ITEM_BUFFER = 4096
"""Texts of served items kept for self-training (trainer.pseudo_labels scores the latest 2,000 by
default); none are kept when it is off (`--annotator.pseudo-label-ratio 0`)."""
MAX_POOLED_CHARS = 10_000
"""Longer items are not pooled: the annotator reads a few hundred tokens of an item, and a pool of
ITEM_BUFFER texts rides along in every checkpoint."""


@dataclass(frozen=True)
class LabelSpace:
    """The annotator's task and labels (from the serving version's head.json)."""

    task: str
    labels: tuple[str, ...]


@dataclass
class TrainerState:
    """Everything the trainer knows: the cursor and what the records up to it were folded into.

    Saved whole and atomically by trainer.checkpoint; model weights are not part of it (each round
    starts from the serving version in the model store).
    """

    cursor: int = 0
    """seq of the last record folded in; the next read is `log.read(after_seq=cursor)`."""
    round: int = 0
    """Rounds run so far (all models)."""
    checkpoint_id: int = 0
    """Number of the last checkpoint written."""
    labels: dict[str, LabelExample] = field(default_factory=dict)
    """Replay buffer: every human-verified label, by decision event_id (a later correction wins)."""
    bandit: list[BanditExample] = field(default_factory=list)
    outcomes: dict[str, LabelOutcome] = field(default_factory=dict)
    """Served labels with their logged propensity and the latest feedback on them, by event_id: the log
    off-policy evaluation reads (trainer/ope.py)."""
    completions: list[LoggedCompletion] = field(default_factory=list)
    """Served completions with their version and logged propensity (off-policy evaluation of the generator)."""
    pairs: list[PreferencePair] = field(default_factory=list)
    ratings: list[RatingExample] = field(default_factory=list)
    pointwise: list[PointwiseExample] = field(default_factory=list)
    demonstrations: list[Demonstration] = field(default_factory=list)
    """Responses people wrote (edits, imported demonstrations): the generator's SFT data."""
    prompts: dict[str, int] = field(default_factory=dict)
    """RL prompt pool: prompt -> seq of the first generation decision that served it."""
    items: dict[str, int] = field(default_factory=dict)
    """Items the annotator labelled for the app, text -> seq of the latest decision on it (latest last):
    the pool a held-out round pseudo-labels the unlabelled ones of (trainer.pseudo_labels)."""
    label_accepts: int = 0
    """Served top labels accepted (r = 1) ..."""
    label_rejects: int = 0
    """... and rejected or corrected (r = 0): the REINFORCE baseline is their mean reward."""
    consumed: Counter[str] = field(default_factory=Counter)
    """Records folded in, by kind ("decision:label", "feedback:accept", ...)."""
    skipped: Counter[str] = field(default_factory=Counter)
    """Feedback records that could not be used, by reason."""
    new_events: Counter[str] = field(default_factory=Counter)
    """Relevant events per model since that model's last round (the round trigger)."""
    last_round_at: dict[str, float] = field(default_factory=dict)
    """Unix time of each model's last round."""
    optimizer_versions: dict[str, str] = field(default_factory=dict)
    """objective -> the model version its checkpointed optimizer state belongs to."""
    rng: dict[str, Any] = field(default_factory=dict)
    """Serialised RNG states (python, torch), filled in by the checkpoint."""

    @property
    def baseline(self) -> float:
        """Mean reward of served labels so far (0.5 with no evidence)."""
        n = self.label_accepts + self.label_rejects
        return (self.label_accepts + 0.5) / (n + 1.0)  # Laplace-smoothed

    def examples(
        self,
    ) -> Iterable[
        LabelExample
        | BanditExample
        | PreferencePair
        | RatingExample
        | PointwiseExample
        | Demonstration
        | LabelOutcome
        | LoggedCompletion
    ]:
        yield from self.labels.values()
        yield from self.outcomes.values()
        yield from self.completions
        yield from self.bandit
        yield from self.pairs
        yield from self.ratings
        yield from self.pointwise
        yield from self.demonstrations


@dataclass
class IngestStats:
    records: int = 0
    used: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


def _skip(state: TrainerState, stats: IngestStats, reason: str) -> None:
    state.skipped[reason] += 1
    stats.skipped[reason] += 1
    EVENTS_SKIPPED.labels(reason=reason).inc()


def _trim(buffer: list[Any], max_size: int) -> None:
    if max_size and len(buffer) > max_size:
        del buffer[: len(buffer) - max_size]  # oldest first


def _trim_table(table: dict[str, Any], max_size: int) -> None:
    if max_size and len(table) > max_size:
        for key in list(table)[: len(table) - max_size]:  # oldest first
            del table[key]


def ingest(
    state: TrainerState,
    records: Sequence[LogRecord],
    labels: LabelSpace,
    *,
    max_buffer: int = 0,
    exclude_clients: frozenset[str] = frozenset(),
    pool_items: int = 0,
) -> IngestStats:
    """Fold `records` (seq order, each seq > state.cursor) into `state`; returns what happened.

    Generation decisions of `exclude_clients` (evaluation, canary, load-test traffic, by x-client-id)
    never enter the RL prompt pool: training on the prompts a model is evaluated on would flatter it.
    `pool_items`: how many label decisions' texts to keep for self-training (0: none)."""
    stats = IngestStats()
    for rec in records:
        if rec.seq <= state.cursor:
            raise ValueError(f"record seq {rec.seq} is not after the cursor {state.cursor}: the log went back")
        stats.records += 1
        if rec.decision is not None:
            if rec.decision.client_id and rec.decision.client_id in exclude_clients:
                state.consumed[f"decision:{rec.decision.kind}:excluded_client"] += 1
            else:
                _fold_decision(state, rec.decision, rec.seq, labels.task if pool_items else None)
        elif rec.feedback is not None:
            if _fold_feedback(state, rec, rec.feedback, labels, stats):
                stats.used += 1
        state.cursor = rec.seq
    _trim(state.completions, COMPLETION_BUFFER)
    for buffer in (state.bandit, state.pairs, state.ratings, state.pointwise, state.demonstrations):
        _trim(buffer, max_buffer)
    for table in (state.labels, state.outcomes, state.prompts):
        _trim_table(table, max_buffer)
    _trim_table(state.items, pool_items)  # 0: none kept (self-training is off)
    if not pool_items:
        state.items.clear()
    if stats.skipped:
        logger.info("ingested %d records, skipped %s", stats.records, dict(stats.skipped))
    return stats


def _fold_decision(state: TrainerState, d: Decision, seq: int, pool_task: str | None) -> None:
    """`pool_task`: the annotator's task, whose label decisions' texts are pooled (None: pool nothing)."""
    state.consumed[f"decision:{d.kind}"] += 1
    if d.kind == "label" and d.task == pool_task and 0 < len(d.input_text) <= MAX_POOLED_CHARS:
        state.items.pop(d.input_text, None)  # re-served (a backlog re-annotation): now among the latest
        state.items[d.input_text] = seq
        return
    if d.kind == "generation" and d.model == DEMONSTRATION_MODEL:
        if d.input_text and isinstance(d.output, str) and d.output:
            state.demonstrations.append(Demonstration(d.input_text, d.output, seq, source="import"))
            state.new_events[GENERATOR] += 1
        return
    if d.kind == "generation" and d.input_text and isinstance(d.output, str) and d.propensity_kind == "logprob":
        state.completions.append(LoggedCompletion(d.input_text, d.output, d.model_version, float(d.propensity), seq))
    if d.kind == "generation" and d.input_text and d.input_text not in state.prompts:
        state.prompts[d.input_text] = seq
        state.new_events[GENERATOR] += 1


def _fold_feedback(state: TrainerState, rec: LogRecord, fb: Feedback, labels: LabelSpace, stats: IngestStats) -> bool:
    """Returns True when the event was used; otherwise it was skipped (and counted)."""
    state.consumed[f"feedback:{fb.kind}"] += 1
    if fb.kind == "preference":
        return _fold_preference(state, rec, fb, stats)
    d = rec.served
    if d is None:
        _skip(state, stats, "missing_join")
        return False
    if d.kind == "label":
        return _fold_label_feedback(state, d, fb, rec.seq, labels, stats)
    response = d.output if isinstance(d.output, str) else ""
    if fb.kind in ("accept", "reject"):
        target = 1.0 if fb.kind == "accept" else 0.0
        state.pointwise.append(PointwiseExample(d.input_text, response, target, rec.seq))
        state.new_events[REWARD] += 1
        return True
    if fb.kind == "rating":
        span = fb.scale_max - fb.scale_min
        if not span > 0:
            _skip(state, stats, "bad_scale")
            return False
        target = min(1.0, max(0.0, (fb.value - fb.scale_min) / span))
        state.ratings.append(RatingExample(d.input_text, response, target, rec.seq))
        state.new_events[REWARD] += 1
        return True
    if fb.kind == "edit":
        if not fb.text or fb.text == response:
            _skip(state, stats, "empty_edit")
            return False
        state.pairs.append(PreferencePair(d.input_text, fb.text, response, rec.seq, source="edit"))
        state.demonstrations.append(Demonstration(d.input_text, fb.text, rec.seq, source="edit"))
        state.new_events[REWARD] += 1
        state.new_events[GENERATOR] += 1
        return True
    _skip(state, stats, "unsupported_kind")  # a correction of a generation: the log refuses these
    return False


def _fold_label_feedback(
    state: TrainerState, d: Decision, fb: Feedback, seq: int, labels: LabelSpace, stats: IngestStats
) -> bool:
    if d.task != labels.task:
        _skip(state, stats, "other_task")
        return False
    if fb.kind not in ("accept", "reject", "correction"):
        _skip(state, stats, "unsupported_kind")  # e.g. a rating of a served label
        return False
    label = fb.label or d.top_label or ""
    if label not in labels.labels:
        _skip(state, stats, "unknown_label")
        return False
    served_top = d.top_label
    if fb.kind == "reject":
        propensity = _propensity(d, label)
        if propensity is None:
            _skip(state, stats, "no_propensity")
            return False
        state.bandit.append(BanditExample(d.input_text, label, propensity, d.event_id, seq))
        if label == served_top:
            state.label_rejects += 1
    else:
        state.labels[d.event_id] = LabelExample(d.input_text, label, d.event_id, seq, source=fb.kind)
        if label == served_top:
            state.label_accepts += 1
        elif fb.kind == "correction":
            state.label_rejects += 1  # the served label was wrong
    _fold_outcome(state, d, fb, label, seq)
    state.new_events[ANNOTATOR] += 1
    state.new_events[ANNOTATOR_HEAD] += 1
    return True


def _fold_outcome(state: TrainerState, d: Decision, fb: Feedback, label: str, seq: int) -> None:
    """The served label's reward, with the probability it was served with (the latest feedback wins).
    A reject of a label other than the one served says nothing about the served one."""
    if d.propensity_kind != "prob" or d.top_label is None or not 0.0 < d.propensity <= 1.0:
        return
    if fb.kind == "reject" and label != d.top_label:
        return
    reward = 1.0 if fb.kind != "reject" and label == d.top_label else 0.0
    state.outcomes[d.event_id] = LabelOutcome(d.input_text, d.top_label, float(d.propensity), reward, d.event_id, seq)


def _propensity(d: Decision, label: str) -> float | None:
    """pi_0(label | x): the logged propensity for the top label, else that label's served score."""
    if d.propensity_kind != "prob":
        return None
    if label == d.top_label:
        return float(d.propensity)
    if isinstance(d.output, str):
        return None
    for name, score in d.output:
        if name == label:
            return float(score) if 0.0 < score <= 1.0 else None
    return None


def _fold_preference(state: TrainerState, rec: LogRecord, fb: Feedback, stats: IngestStats) -> bool:
    joined = {d.event_id: d for d in rec.joined_decisions}
    chosen, rejected = joined.get(fb.chosen_event_id), joined.get(fb.rejected_event_id)
    if chosen is not None and rejected is not None:
        if chosen.kind != "generation" or rejected.kind != "generation":
            _skip(state, stats, "wrong_decision_kind")
            return False
        pair = PreferencePair(chosen.input_text, str(chosen.output), str(rejected.output), rec.seq, "events")
    elif fb.prompt and fb.chosen and fb.rejected:
        pair = PreferencePair(fb.prompt, fb.chosen, fb.rejected, rec.seq, "texts")
    else:
        _skip(state, stats, "missing_join")
        return False
    if pair.chosen == pair.rejected:
        _skip(state, stats, "identical_pair")
        return False
    state.pairs.append(pair)
    state.new_events[REWARD] += 1
    state.new_events[GENERATOR] += 1
    return True
