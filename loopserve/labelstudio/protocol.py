"""Label Studio JSON <-> loopserve, as plain functions (no HTTP, no gRPC).

Shapes follow Label Studio's ML backend protocol (label_studio/ml/api_connector.py on its side):
`/predict` gets `{"tasks": [{"id", "data": {...}}], "project": "<id>.<created>", "label_config"}` and
answers `{"results": [{"result": [...], "score", "model_version"}]}`, one entry per task, in order.
A prediction's result region carries the loopserve `event_id` as its region `id`: Label Studio keeps
region ids when an annotator starts from a prediction, so the submitted annotation names the event it
judges, and feedback joins to it without any state in the adapter.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loopserve.errors import InvalidArgument
from loopserve.labelstudio.labeling_config import ChoicesTask

EVENT_ID = re.compile(r"^[0-9a-f]{32}$")
"""loopserve's event ids (uuid4 hex): a region id of this form is one of ours."""


@dataclass(frozen=True)
class TaskText:
    task_id: int
    text: str | None  # None: the task has no usable text (reported as an empty prediction)


@dataclass(frozen=True)
class Prediction:
    event_id: str
    label: str
    score: float
    model_version: str


@dataclass(frozen=True)
class SubmittedLabel:
    """What an annotation says about one of our predictions."""

    project_id: int
    task_id: int
    annotation_id: int
    revision: str
    label: str
    region_ids: tuple[str, ...]
    parent_prediction: int | None
    annotator: str


def project_id(value: object) -> int:
    """Label Studio names a project as `"<id>.<created timestamp>"` in predict/setup, as an int or a
    serialized project in webhooks."""
    if isinstance(value, Mapping):
        value = value.get("id")
    if isinstance(value, bool):
        raise InvalidArgument("project must be a project id")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.split(".", 1)[0].isdigit():
        return int(value.split(".", 1)[0])
    raise InvalidArgument("project must be a Label Studio project id")


def tasks_texts(tasks: object, task: ChoicesTask, max_text_chars: int) -> list[TaskText]:
    if not isinstance(tasks, list):
        raise InvalidArgument("tasks must be a list of Label Studio tasks")
    out = []
    for i, t in enumerate(tasks):
        if not isinstance(t, Mapping) or not isinstance(t.get("id"), int) or isinstance(t.get("id"), bool):
            raise InvalidArgument(f"tasks[{i}] must be an object with an integer id")
        data = t.get("data")
        text = data.get(task.data_key) if isinstance(data, Mapping) else None
        ok = isinstance(text, str) and text.strip() and len(text) <= max_text_chars
        out.append(TaskText(t["id"], text if ok else None))  # type: ignore[arg-type]
    return out


def prediction_json(p: Prediction | None, task: ChoicesTask, model_version: str) -> dict[str, Any]:
    """One `/predict` result entry; an empty one for a task that has no text to label."""
    if p is None:
        return {"result": [], "score": 0.0, "model_version": model_version}
    region = {
        "id": p.event_id,
        "from_name": task.from_name,
        "to_name": task.to_name,
        "type": "choices",
        "value": {"choices": [p.label]},
        "score": p.score,
    }
    return {"result": [region], "score": p.score, "model_version": p.model_version}


def prediction_event(prediction: Mapping[str, Any], task: ChoicesTask) -> tuple[str, str] | None:
    """(event_id, label) of a stored Label Studio prediction we made, or None."""
    for region in prediction.get("result") or ():
        if not isinstance(region, Mapping) or region.get("from_name") != task.from_name:
            continue
        rid, label = region.get("id"), _choice(region)
        if isinstance(rid, str) and EVENT_ID.match(rid) and label:
            return rid, label
    return None


def _choice(region: Mapping[str, Any]) -> str | None:
    value = region.get("value")
    choices = value.get("choices") if isinstance(value, Mapping) else None
    if isinstance(choices, list) and len(choices) == 1 and isinstance(choices[0], str):
        return choices[0]
    return None


def submitted_label(annotation: Mapping[str, Any], task_json: Mapping[str, Any], task: ChoicesTask) -> SubmittedLabel:
    """The label an ANNOTATION_CREATED / ANNOTATION_UPDATED payload submits for our control."""
    ann_id = annotation.get("id")
    if not isinstance(ann_id, int) or isinstance(ann_id, bool):
        raise InvalidArgument("annotation.id must be an integer")
    task_id = annotation.get("task", task_json.get("id"))
    if isinstance(task_id, Mapping):
        task_id = task_id.get("id")
    if not isinstance(task_id, int) or isinstance(task_id, bool):
        raise InvalidArgument("the annotation's task id must be an integer")
    regions = [
        r for r in annotation.get("result") or () if isinstance(r, Mapping) and r.get("from_name") == task.from_name
    ]
    labels = {c for c in (_choice(r) for r in regions) if c}
    if len(labels) != 1:
        raise InvalidArgument(f"the annotation must choose exactly one {task.from_name!r} label (it has {len(labels)})")
    parent = annotation.get("parent_prediction")
    revision = annotation.get("updated_at") or annotation.get("created_at") or ""
    who = annotation.get("completed_by")
    if isinstance(who, Mapping):
        who = who.get("id")
    return SubmittedLabel(
        project_id=project_id(annotation.get("project", task_json.get("project"))),
        task_id=task_id,
        annotation_id=ann_id,
        revision=str(revision),
        label=labels.pop(),
        region_ids=tuple(str(r.get("id")) for r in regions if r.get("id")),
        parent_prediction=parent if isinstance(parent, int) and not isinstance(parent, bool) else None,
        annotator=f"labelstudio:{who}" if who is not None else "labelstudio",
    )


def idempotency_key(s: SubmittedLabel) -> str:
    """One key per annotation revision: a re-sent webhook is a duplicate, an edited annotation is new
    feedback. The revision is Label Studio's `updated_at`, hashed with the label into a short id."""
    digest = hashlib.sha256(f"{s.revision}\x00{s.label}".encode()).hexdigest()[:16]
    return f"labelstudio:{s.project_id}:{s.annotation_id}:{digest}"


def chunks(xs: Sequence[Any], n: int) -> list[Sequence[Any]]:
    return [xs[i : i + n] for i in range(0, len(xs), max(1, n))]
