"""Validation of decisions and feedback: pure functions that raise domain errors.

Messages go back to the person who sent the event, so each says what was wrong and what to send
instead. They may quote ids and labels (the client's own input) but are never written to server logs.

Two stages, so that a batch is checked as far as possible before a write transaction is opened:
`check_feedback_shape` needs nothing but the event; `validate_feedback` also needs the decisions the
event refers to and the task's label set.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping

from loopserve.errors import FailedPrecondition, InvalidArgument, NotFoundError, quote
from loopserve.feedback_log.records import (
    DECISION_KINDS,
    FEEDBACK_KINDS,
    LABEL_FEEDBACK_KINDS,
    Decision,
    Feedback,
    labels_of,
)

MAX_ID_CHARS = 256
"""event ids, idempotency keys, labels, task and model names."""
MAX_TEXT_CHARS = 200_000
"""Item texts, prompts, completions, edits: generous, but a bound (nothing a client sends is unbounded)."""
_MAX_LABELS_IN_MESSAGE = 20


def _check_unicode(name: str, value: str) -> None:
    # Databases store UTF-8: a lone surrogate (possible from JSON, never from protobuf) cannot be
    # encoded and would fail the whole transaction, i.e. everyone else's events in the batch.
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument(f"{name} is not valid Unicode text") from None


def _check_id(name: str, value: object, *, required: bool = True) -> None:
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a string")
    if required and not value.strip():
        raise InvalidArgument(f"{name} is empty")
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgument(f"{name} is {len(value)} characters long; the limit is {MAX_ID_CHARS}")
    # Ids are stored in their own indexed columns, where PostgreSQL rejects NUL characters.
    if "\x00" in value:
        raise InvalidArgument(f"{name} contains a NUL character")
    _check_unicode(name, value)


def _check_text(name: str, value: object, *, required: bool) -> None:
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a string")
    if required and not value:
        raise InvalidArgument(f"{name} is empty")
    if len(value) > MAX_TEXT_CHARS:
        raise InvalidArgument(f"{name} is {len(value)} characters long; the limit is {MAX_TEXT_CHARS}")
    _check_unicode(name, value)


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name} must be a number")
    if not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {value}")
    return float(value)


def validate_decision(d: Decision) -> None:
    """Check a served answer before it is queued for the log (a bad one is a server bug: fail loudly)."""
    _check_id("event_id", d.event_id)
    _check_id("task", d.task)
    _check_id("model", d.model)
    _check_id("model_version", d.model_version)
    _check_id("client_id", d.client_id, required=False)
    if d.kind not in DECISION_KINDS:
        raise InvalidArgument(f"decision kind must be one of {sorted(DECISION_KINDS)}, got {d.kind!r}")
    _check_text("input_text", d.input_text, required=False)
    if d.kind == "label":
        if isinstance(d.output, str) or not d.output:
            raise InvalidArgument("a label decision's output is a non-empty list of (label, score), best first")
        for label, score in d.output:
            _check_id("label", label)
            _finite("label score", score)
    else:
        _check_text("completion", d.output, required=False)
    p = _finite("propensity", d.propensity)
    if d.propensity_kind == "prob":
        if not 0.0 <= p <= 1.0:
            raise InvalidArgument(f"propensity of kind 'prob' must lie in [0, 1], got {p}")
    elif d.propensity_kind == "logprob":
        if p > 0.0:
            raise InvalidArgument(f"propensity of kind 'logprob' must be <= 0, got {p}")
    else:
        raise InvalidArgument(f"propensity_kind must be 'prob' or 'logprob', got {d.propensity_kind!r}")
    _finite("created", d.created)


def check_feedback_shape(fb: Feedback) -> None:
    """Everything that can be checked without the log: key, kind, required fields, numbers."""
    if not isinstance(fb.idempotency_key, str) or not fb.idempotency_key.strip():
        raise InvalidArgument(
            "idempotency_key is empty: give every event a unique key (e.g. a UUID) so that a retry "
            "is recognised and not stored twice"
        )
    _check_id("idempotency_key", fb.idempotency_key)
    if fb.kind not in FEEDBACK_KINDS:
        raise InvalidArgument(f"feedback kind must be one of {sorted(FEEDBACK_KINDS)}, got {quote(fb.kind)}")
    _check_id("annotator_id", fb.annotator_id, required=False)
    _check_id("label", fb.label, required=False)
    _finite("created", fb.created)
    if fb.kind == "preference":
        _check_preference_shape(fb)
        return
    if not fb.event_id:
        raise InvalidArgument(f"{fb.kind} needs the event_id of the served answer it is about")
    _check_id("event_id", fb.event_id)
    if fb.kind == "correction" and not fb.label:
        raise InvalidArgument("correction needs the right label in `label`")
    if fb.kind == "rating":
        value = _finite("rating value", fb.value)
        lo = _finite("scale_min", fb.scale_min)
        hi = _finite("scale_max", fb.scale_max)
        if lo >= hi:
            raise InvalidArgument(
                f"rating scale_min ({lo}) must be below scale_max ({hi}); declare the scale, e.g. 1 to 5"
            )
        if not lo <= value <= hi:
            raise InvalidArgument(f"rating value {value} lies outside its declared scale [{lo}, {hi}]")
    if fb.kind == "edit":
        _check_text("edit text", fb.text, required=True)


def _has_texts(fb: Feedback) -> bool:
    return bool(fb.prompt and fb.chosen and fb.rejected)


def _check_preference_shape(fb: Feedback) -> None:
    for name in ("chosen_event_id", "rejected_event_id"):
        _check_id(name, getattr(fb, name), required=False)
    for name in ("prompt", "chosen", "rejected"):
        _check_text(name, getattr(fb, name), required=False)
    has_ids = bool(fb.chosen_event_id and fb.rejected_event_id)
    if not has_ids and not _has_texts(fb):
        raise InvalidArgument(
            "preference needs chosen_event_id and rejected_event_id, or prompt, chosen and rejected texts"
        )
    if has_ids and fb.chosen_event_id == fb.rejected_event_id:
        raise InvalidArgument(f"preference compares event {fb.chosen_event_id} with itself; give two different answers")
    if not has_ids and fb.chosen == fb.rejected:
        raise InvalidArgument("preference chosen and rejected texts are identical; give two different answers")


def label_set_for(decision: Decision, label_sets: Mapping[str, Collection[str]]) -> Collection[str]:
    """The task's declared labels; if the caller declared none for it, the labels this decision ranked."""
    labels = label_sets.get(decision.task)
    return labels if labels is not None else labels_of(decision)


def _unknown_event(event_id: str) -> NotFoundError:
    return NotFoundError(
        f"unknown event_id {quote(event_id)}: no served answer has this id (check it came from this "
        "deployment's Annotate/Generate response)"
    )


def validate_feedback(
    fb: Feedback, decisions: Mapping[str, Decision], label_sets: Mapping[str, Collection[str]]
) -> Feedback:
    """Check `fb` against the decisions it refers to; return it normalised for storage.

    `decisions` maps event_id to the stored decision (missing ids are unknown events). `label_sets`
    maps task to its labels. Normalisation: an accept or reject with no label judges the served top
    label, so the stored event names it explicitly.
    """
    check_feedback_shape(fb)
    return check_feedback_references(fb, decisions, label_sets)


def check_feedback_references(
    fb: Feedback, decisions: Mapping[str, Decision], label_sets: Mapping[str, Collection[str]]
) -> Feedback:
    """The second stage of `validate_feedback`, for an event whose shape was already checked."""
    if fb.kind == "preference":
        _check_preference(fb, decisions)
        return fb
    decision = decisions.get(fb.event_id)
    if decision is None:
        raise _unknown_event(fb.event_id)
    if fb.kind in ("accept", "reject") and decision.kind == "generation":
        # Thumbs up / down on a completion: a pointwise target for the reward model (DESIGN.md).
        if fb.label:
            raise InvalidArgument(f"{fb.kind} on a generation takes no label (event {fb.event_id})")
        return fb
    if fb.kind in LABEL_FEEDBACK_KINDS:
        if decision.kind != "label":
            raise FailedPrecondition(
                f"{fb.kind} applies to served labels, but event {fb.event_id} is a generation "
                "(use accept, reject, rating, edit or preference)"
            )
        if not fb.label:
            return dataclasses.replace(fb, label=decision.top_label or "")
        labels = label_set_for(decision, label_sets)
        if fb.label not in labels:
            shown = sorted(labels)[:_MAX_LABELS_IN_MESSAGE]
            more = "" if len(labels) <= _MAX_LABELS_IN_MESSAGE else f" and {len(labels) - len(shown)} more"
            raise InvalidArgument(
                f"unknown label {quote(fb.label)} for task {quote(decision.task)}; expected one of {shown}{more}"
            )
    elif fb.kind == "edit" and decision.kind != "generation":
        raise FailedPrecondition(
            f"edit applies to generations, but event {fb.event_id} is a served label (use correction)"
        )
    return fb


def _check_preference(fb: Feedback, decisions: Mapping[str, Decision]) -> None:
    if not (fb.chosen_event_id and fb.rejected_event_id):
        return  # text-only: fully checked by its shape
    chosen = decisions.get(fb.chosen_event_id)
    rejected = decisions.get(fb.rejected_event_id)
    if chosen is None or rejected is None:
        if _has_texts(fb):
            return  # the event carries its own texts: it stands on its own
        raise _unknown_event(fb.chosen_event_id if chosen is None else fb.rejected_event_id)
    for d in (chosen, rejected):
        if d.kind != "generation":
            raise FailedPrecondition(
                f"preference compares generations, but event {d.event_id} is a served label "
                "(use accept, reject or correction)"
            )
    if chosen.input_text != rejected.input_text:
        raise InvalidArgument(
            f"preference compares two answers to the same prompt, but events {chosen.event_id} and "
            f"{rejected.event_id} answer different prompts"
        )
    if fb.prompt and fb.prompt != chosen.input_text:
        raise InvalidArgument(
            f"preference prompt differs from the prompt events {chosen.event_id} and "
            f"{rejected.event_id} answered; send the ids alone or the matching prompt"
        )
