"""Set up a Label Studio project with loopserve behind it, through the official SDK: what
`loopserve labelstudio connect` does, and what the tests do to a real Label Studio server.

1. create a text-classification project whose choices are the served annotator's labels, with
   uncertainty sampling (Label Studio orders the labeling queue by prediction score, lowest first);
2. import tasks (Fine Food reviews from loopserve.datasets, or a user's JSONL / CSV);
3. connect the adapter as the project's ML backend with HTTP basic auth (the annotator token as the
   password), and give the webhook Label Studio creates for it the same token, since Label Studio
   sends webhooks without the ML backend's credentials.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loopserve.labelstudio.labeling_config import text_classification_config
from loopserve.labelstudio.labelstudio_api import LabelStudioAPI, _dump

UNCERTAINTY_SAMPLING = "Uncertainty sampling"


@dataclass(frozen=True)
class ConnectedProject:
    project: int
    ml_backend: int
    webhook: int | None
    tasks: int
    url: str


def create_project(api: LabelStudioAPI, title: str, labels: list[str]) -> int:
    p = api.sdk.projects.create(
        title=title,
        label_config=text_classification_config(labels),
        sampling=UNCERTAINTY_SAMPLING,
        # Pre-annotate: a task opened without a prediction gets one. Not `evaluate_predictions_automatically`:
        # that predicts as a side effect of every task listing, racing with the refresh after a swap.
        show_collab_predictions=True,
        evaluate_predictions_automatically=False,
    )
    return int(_dump(p)["id"])


def readable(text: str) -> str:
    """Fine Food reviews carry HTML line breaks, which Label Studio's <Text> shows literally."""
    return text.replace("<br />", "\n").replace("<br/>", "\n")


def import_texts(api: LabelStudioAPI, project: int, texts: list[str], meta: list[dict[str, Any]] | None = None) -> int:
    tasks = [{"text": readable(t), **(meta[i] if meta else {})} for i, t in enumerate(texts)]
    r = _dump(api.sdk.projects.import_tasks(id=project, request=tasks, return_task_ids=True))
    return int(r.get("task_count") or len(tasks))


def connect_ml_backend(
    api: LabelStudioAPI, project: int, backend_url: str, token: str | None, title: str = "loopserve"
) -> tuple[int, int | None]:
    """Connect the adapter at `backend_url`; returns (ml backend id, webhook id or None)."""
    kw: dict[str, Any] = {}
    if token:
        kw = {"auth_method": "BASIC_AUTH", "basic_auth_user": "labelstudio", "basic_auth_pass": token}
    ml = _dump(api.sdk.ml.create(project=project, url=backend_url, title=title, is_interactive=False, **kw))
    hook_url = backend_url.rstrip("/") + "/webhook"
    webhook_id = None
    for h in api.sdk.webhooks.list(project=project):
        d = _dump(h)
        if d.get("url") == hook_url:
            webhook_id = int(d["id"])
            if token:
                api.sdk.webhooks.update(id=webhook_id, headers={"Authorization": f"Bearer {token}"})
    return int(ml["id"]), webhook_id


def predict_all(api: LabelStudioAPI, project: int) -> None:
    """The Data Manager's "Retrieve predictions" on every task: Label Studio calls /setup, then /predict."""
    api.sdk.actions.create(
        id="retrieve_tasks_predictions", project=project, selected_items={"all": True, "excluded": []}
    )


def connect(
    api: LabelStudioAPI,
    *,
    backend_url: str,
    token: str | None,
    labels: list[str],
    texts: list[str],
    title: str = "loopserve: Fine Food reviews",
) -> ConnectedProject:
    project = create_project(api, title, labels)
    n = import_texts(api, project, texts)
    ml, hook = connect_ml_backend(api, project, backend_url, token)
    predict_all(api, project)  # pre-annotated from the start, so uncertainty sampling has scores to order by
    return ConnectedProject(project, ml, hook, n, f"{api.url}/projects/{project}/data")
