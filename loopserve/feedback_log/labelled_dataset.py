"""The product of an annotation run: its labelled data set, read back from the feedback log.

Per item (an item is its text: the log keys decisions by what was served, and the same text served
twice is the same item), the row holds

- the human label, when a person accepted a served label (that label) or corrected it (the label they
  gave); when several people answered, the latest answer stands, as in the trainer's replay buffer;
- otherwise the label of the latest served version that annotated it (highest version number, then the
  latest decision), with that version's probability for it, and whether that version was checked by
  the trainer's gate (when a model store is given): labels of an unchecked version are guesses.

A reject without a correction says only that the served label was wrong; the row then keeps the
model's label but records the reject (`rejected_labels`), so a consumer can drop or re-queue it.

`loopserve dataset export` writes these rows as JSON lines to a file created 0600 (they hold user text).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from loopserve.feedback_log.base import FeedbackLog
from loopserve.feedback_log.records import Decision
from loopserve.models.store import ModelStore, version_number


@dataclass
class DatasetRow:
    text: str
    label: str
    source: str
    """"human" | "model"."""
    task: str = ""
    probability: float | None = None
    """The model's probability for `label` (source "model")."""
    model_version: str = ""
    """The version whose label this is (source "model"), or that served the item people labelled."""
    model_checked: bool | None = None
    """Whether that version passed the trainer's gate (None: no store given)."""
    human_labels: int = 0
    """How many human answers the item got (accepts and corrections)."""
    rejected_labels: list[str] = field(default_factory=list)


@dataclass
class _Item:
    decision: Decision
    human: str | None = None
    human_seq: int = 0
    answers: int = 0
    rejected: list[str] = field(default_factory=list)


def _newer(a: Decision, b: Decision) -> bool:
    """Whether `a` comes from a later version than `b` (then, on the same version, was served later)."""
    try:
        va, vb = version_number(a.model_version), version_number(b.model_version)
    except ValueError:
        va = vb = 0
    return (va, a.created) > (vb, b.created)


def labelled_dataset(log: FeedbackLog, task: str = "", store: ModelStore | None = None) -> Iterator[DatasetRow]:
    """Rows of the labelled data set, in the order items were first served."""
    items: dict[str, _Item] = {}
    by_event: dict[str, str] = {}
    cursor = 0
    while True:
        records = log.read(cursor, 5000)
        if not records:
            break
        for rec in records:
            cursor = rec.seq
            d = rec.decision
            if d is not None:
                if d.kind != "label" or (task and d.task != task):
                    continue
                by_event[d.event_id] = d.input_text
                item = items.get(d.input_text)
                if item is None:
                    items[d.input_text] = _Item(d)
                elif _newer(d, item.decision):
                    item.decision = d
                continue
            fb = rec.feedback
            if fb is None or fb.kind not in ("accept", "correction", "reject") or fb.event_id not in by_event:
                continue
            item = items[by_event[fb.event_id]]
            served = rec.served
            if fb.kind == "reject":
                item.rejected.append(fb.label or (served.top_label if served else "") or "")
                continue
            label = fb.label if fb.kind == "correction" else (fb.label or (served.top_label if served else None))
            if label:
                item.human, item.human_seq, item.answers = label, rec.seq, item.answers + 1
    checked: dict[str, bool] = {}
    for text, item in items.items():
        d = item.decision
        version_checked: bool | None = None
        if store is not None:
            if d.model_version not in checked:
                try:
                    checked[d.model_version] = bool(store.get(d.model, d.model_version).meta.get("checked"))
                except Exception:  # a version pruned from the store: unknown, so not trusted
                    checked[d.model_version] = False
            version_checked = checked[d.model_version]
        if item.human is not None:
            yield DatasetRow(
                text, item.human, "human", d.task, None, d.model_version, version_checked, item.answers, item.rejected
            )
            continue
        top = d.output[0] if not isinstance(d.output, str) and d.output else ("", 0.0)
        yield DatasetRow(
            text, top[0], "model", d.task, float(top[1]), d.model_version, version_checked, 0, item.rejected
        )


def export_dataset(rows: Iterator[DatasetRow], dest: Path | IO[str]) -> int:
    """Write rows as JSON lines; a path is created 0600 (it holds user text). Returns the row count."""
    n = 0
    if isinstance(dest, Path):
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            return export_dataset(rows, f)
    for row in rows:
        dest.write(json.dumps(asdict(row)) + "\n")
        n += 1
    return n
