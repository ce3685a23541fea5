"""The few Label Studio API calls the adapter makes, through the official SDK (`label-studio-sdk`).

Only the SDK's generated HTTP client (`label_studio_sdk.base_client`) is imported: it needs httpx and
pydantic, which loopserve pins; the SDK's converters (pandas, OpenCV, NLTK) are never loaded. Calls are
blocking (httpx); the async adapter runs them in a worker thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

TIMEOUT_S = 30.0
PAGE_SIZE = 100


@dataclass(frozen=True)
class StoredTask:
    id: int
    data: dict[str, Any]
    annotations: int
    predictions: list[dict[str, Any]]


def _dump(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    return obj.model_dump(mode="json") if hasattr(obj, "model_dump") else dict(obj)


class LabelStudioAPI:
    """A Label Studio server at `url`, called with a user's API token (legacy token or personal access
    token; the SDK tells them apart)."""

    def __init__(self, url: str, token: str, timeout_s: float = TIMEOUT_S) -> None:
        from label_studio_sdk.base_client import LabelStudioBase

        self.url = url.rstrip("/")
        self.sdk = LabelStudioBase(base_url=self.url, api_key=token, timeout=timeout_s)

    # ---- tasks and predictions ----------------------------------------------------------------

    def tasks(self, project: int) -> Iterator[StoredTask]:
        """Every task of a project, with its predictions and its number of annotations."""
        for t in self._pages(project):
            d = _dump(t)
            yield StoredTask(
                id=int(d["id"]),
                data=d.get("data") or {},
                annotations=int(d.get("total_annotations") or len(d.get("annotations") or [])),
                predictions=[_dump(p) for p in d.get("predictions") or []],
            )

    def _pages(self, project: int) -> Iterator[Any]:
        # Page by page by hand: the SDK's pager asks for one page past the end, which Label Studio
        # 1.23 answers with 404 "Invalid page".
        from label_studio_sdk.core.api_error import ApiError

        page = 1
        while True:
            try:
                items = list(
                    self.sdk.tasks.list(project=project, fields="all", page=page, page_size=PAGE_SIZE).items or []
                )
            except ApiError as e:
                if e.status_code == 404 and page > 1:
                    return
                raise
            yield from items
            if len(items) < PAGE_SIZE:
                return
            page += 1

    def task_predictions(self, task: int) -> list[dict[str, Any]]:
        return [_dump(p) for p in self.sdk.predictions.list(task=task)]

    def prediction(self, prediction_id: int) -> dict[str, Any]:
        return _dump(self.sdk.predictions.get(id=prediction_id))

    def create_prediction(
        self, task: int, result: list[dict[str, Any]], score: float, model_version: str
    ) -> dict[str, Any]:
        return _dump(self.sdk.predictions.create(task=task, result=result, score=score, model_version=model_version))

    def delete_prediction(self, prediction_id: int) -> None:
        self.sdk.predictions.delete(id=prediction_id)

    def import_predictions(self, project: int, predictions: list[dict[str, Any]]) -> None:
        """Create many predictions (`{"task", "result", "score", "model_version"}`) in one call."""
        if predictions:
            self.sdk.projects.import_predictions(id=project, request=predictions)

    def delete_all_predictions(self, project: int, tasks: list[int]) -> None:
        """Delete every prediction of `tasks` in one call (the Data Manager's action)."""
        if tasks:
            self.sdk.actions.create(
                id="delete_tasks_predictions", project=project, selected_items={"all": False, "included": tasks}
            )

    # ---- projects ------------------------------------------------------------------------------

    def project(self, project: int) -> dict[str, Any]:
        return _dump(self.sdk.projects.get(id=project))

    def set_model_version(self, project: int, model_version: str) -> None:
        """The version whose predictions Label Studio shows and samples by (uncertainty sampling)."""
        self.sdk.projects.update(id=project, model_version=model_version)

    def close(self) -> None:
        client = getattr(self.sdk, "_client_wrapper", None)
        http = getattr(getattr(client, "httpx_client", None), "httpx_client", None)
        if http is not None:
            http.close()
