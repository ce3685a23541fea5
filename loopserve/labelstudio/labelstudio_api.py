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
        for t in self.sdk.tasks.list(project=project, fields="all", page_size=PAGE_SIZE):
            d = _dump(t)
            yield StoredTask(
                id=int(d["id"]),
                data=d.get("data") or {},
                annotations=int(d.get("total_annotations") or len(d.get("annotations") or [])),
                predictions=[_dump(p) for p in d.get("predictions") or []],
            )

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
