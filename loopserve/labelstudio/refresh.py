"""Fresh pre-annotations after a swap (label-studio-ml-backend#14: predictions go stale after retraining).

When the serving annotator version changes, every task of a connected project whose loopserve
prediction came from an older version and that nobody has annotated yet is re-predicted by the new
version: the new prediction is created through Label Studio's API and the stale one deleted, so an
annotator never reviews an old pre-annotation. Annotated tasks keep the prediction their annotator
judged (the feedback log joins to it). The project's `model_version` is set to the serving version,
so Label Studio shows the new predictions and its uncertainty sampling orders tasks by their score
(the model's top probability: least confident first).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loopserve.labelstudio import protocol
from loopserve.labelstudio.labeling_config import ChoicesTask
from loopserve.labelstudio.labelstudio_api import LabelStudioAPI, StoredTask
from loopserve.policy.v1 import policy_pb2

if TYPE_CHECKING:
    from loopserve.labelstudio.backend import MLBackend


@dataclass
class RefreshStats:
    refreshed: int = 0
    annotated_stale: int = 0


def _stale(t: StoredTask, task: ChoicesTask, version: str) -> list[int]:
    """Ids of this task's loopserve predictions, when none of them is from `version`."""
    ours = [p for p in t.predictions if protocol.prediction_event(p, task)]
    if not ours or any(p.get("model_version") == version for p in ours):
        return []
    return [int(p["id"]) for p in ours]


async def refresh_project(
    backend: MLBackend, ls: LabelStudioAPI, project: int, task: ChoicesTask, info: policy_pb2.ModelInfo
) -> RefreshStats:
    version = info.annotator_version
    stored = await asyncio.to_thread(lambda: list(ls.tasks(project)))
    stats = RefreshStats()
    todo: list[tuple[StoredTask, list[int]]] = []
    for t in stored:
        stale = _stale(t, task, version)
        if not stale:
            continue
        if t.annotations:
            stats.annotated_stale += 1
        else:
            todo.append((t, stale))
    by_id = {t.id: (t, stale) for t, stale in todo}
    texts = protocol.tasks_texts([{"id": t.id, "data": t.data} for t, _ in todo], task, info.max_text_chars or 20_000)
    predictions = await backend.annotate(
        project, [x for x in texts if x.text is not None], info, backend.background_token()
    )
    # Two calls per project, not two per task: delete the stale predictions of tasks holding only
    # ours in one Data Manager action, one by one where another model's predictions sit beside them;
    # then create the fresh ones in one import.
    only_ours = [tid for tid in predictions if len(by_id[tid][0].predictions) == len(by_id[tid][1])]
    await asyncio.to_thread(ls.delete_all_predictions, project, only_ours)
    deleted = set(only_ours)
    for tid in predictions:
        if tid not in deleted:
            for old in by_id[tid][1]:
                await asyncio.to_thread(ls.delete_prediction, old)
    fresh = [{"task": tid, **protocol.prediction_json(p, task, p.model_version)} for tid, p in predictions.items()]
    await asyncio.to_thread(ls.import_predictions, project, fresh)
    stats.refreshed = len(fresh)
    await asyncio.to_thread(ls.set_model_version, project, version)
    return stats
