"""The adapter's logic: Label Studio's ML backend calls, answered through loopserve's own gRPC client.

Every call is made with the caller's token (an annotator token, checked here before the body is read
and again by the policy service), so the policy service applies its usual validation, limits, logging
and metrics. `/predict` is `Annotate` (each prediction keeps its `event_id`); an annotation submitted
in Label Studio becomes `FeedbackService.Submit` (an accept when it keeps the predicted label, a
correction otherwise), with an idempotency key from the annotation id and revision, so webhooks that
Label Studio re-sends are acknowledged, not stored twice. `START_TRAINING` and `/train` ask the trainer
for a round (loopserve/annotation/round_requests.py). A background task watches the serving version and, after a
swap, re-predicts the tasks whose pre-annotation an older version made (refresh.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from grpc import aio

from loopserve import auth
from loopserve.annotation.round_requests import request_round
from loopserve.client import AsyncClient, RetryPolicy
from loopserve.errors import FailedPrecondition, InvalidArgument, LoopserveError, Unauthenticated
from loopserve.feedback.v1 import feedback_pb2 as fb
from loopserve.labelstudio import protocol
from loopserve.labelstudio.config import MLBackendConfig
from loopserve.labelstudio.labeling_config import ChoicesTask, UnsupportedConfig, parse_labeling_config
from loopserve.labelstudio.labelstudio_api import LabelStudioAPI
from loopserve.policy.v1 import policy_pb2

logger = logging.getLogger(__name__)

NEEDED_ROLE = "annotator"  # predictions and feedback both: Label Studio is an annotation tool
MAX_CLIENTS = 16
MAX_REMEMBERED_EVENTS = 200_000
ANNOTATION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
ANNOTATOR_MODEL = "annotator"


class GrpcCallError(LoopserveError):
    """A policy-service call failed: carries its status code name and message (already client-safe)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class TooManyTasks(LoopserveError):
    """More tasks in one /predict than `max_tasks_per_request` (HTTP 413)."""

    code = "RESOURCE_EXHAUSTED"


def _grpc_error(e: aio.AioRpcError) -> GrpcCallError:
    return GrpcCallError(e.code().name, e.details() or e.code().name)


def token_from_header(authorization: str) -> str:
    """`Bearer <token>`, or HTTP basic auth with the token as the password (any user name): the two
    ways Label Studio's ML backend connection can send it."""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme.lower() == "basic" and value.strip():
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthenticated("malformed basic auth header") from None
        _user, sep, password = decoded.partition(":")
        if sep and password:
            return password
    raise Unauthenticated(
        "missing token: connect with HTTP basic auth (any user name, an annotator token as the password) "
        "or send 'Authorization: Bearer <token>'"
    )


@dataclass(frozen=True)
class Served:
    label: str
    model_version: str
    project: int
    task: int


class EventIndex:
    """What the adapter predicted recently (bounded; Label Studio is asked when it forgot)."""

    def __init__(self, capacity: int = MAX_REMEMBERED_EVENTS) -> None:
        self.capacity = capacity
        self._events: OrderedDict[str, Served] = OrderedDict()
        self._latest: dict[tuple[int, int], str] = {}

    def add(self, event_id: str, served: Served) -> None:
        self._events[event_id] = served
        self._latest[(served.project, served.task)] = event_id
        while len(self._events) > self.capacity:
            old_id, old = self._events.popitem(last=False)
            if self._latest.get((old.project, old.task)) == old_id:
                del self._latest[(old.project, old.task)]

    def get(self, event_id: str) -> Served | None:
        return self._events.get(event_id)

    def latest(self, project: int, task: int) -> str | None:
        return self._latest.get((project, task))


class MLBackend:
    """Plain async logic; the HTTP routes (http_app.py) only read, authenticate, call and convert."""

    def __init__(self, cfg: MLBackendConfig, table: auth.TokenTable | None) -> None:
        self.cfg = cfg
        self.table = table  # None: no auth (development only)
        self.events = EventIndex()
        self.projects: dict[int, ChoicesTask] = {}
        self._configs: dict[str, ChoicesTask] = {}
        self._clients: OrderedDict[str | None, AsyncClient] = OrderedDict()
        self._ls: LabelStudioAPI | None = (
            LabelStudioAPI(cfg.label_studio_url, cfg.label_studio_token)
            if cfg.label_studio_url and cfg.label_studio_token
            else None
        )
        self._ls_from_config = self._ls is not None
        self.serving_version = ""
        self._watch: asyncio.Task[None] | None = None
        self.fresh: dict[int, str] = {}  # project -> the version its pre-annotations were last refreshed to
        self.refreshes = 0  # completed project refreshes

    # ---- auth and clients ------------------------------------------------------------------------

    def authenticate(self, authorization: str) -> str | None:
        """The caller's token if it holds the annotator role; raises Unauthenticated / PermissionDenied.
        Runs before the request body is read."""
        if self.table is None:
            return None
        token = token_from_header(authorization)
        role = self.table.role_of(token)
        if role is None:
            raise Unauthenticated("unknown token")
        if auth.ROLES.index(role) < auth.ROLES.index(NEEDED_ROLE):
            raise auth.PermissionDenied(
                f"Label Studio calls need the {NEEDED_ROLE} role; the token has the {role} role"
            )
        return token

    def background_token(self) -> str | None:
        """The token the swap watcher calls with: the annotator token of the shared token table."""
        if self.table is None:
            return None
        for role in (NEEDED_ROLE, "admin"):
            try:
                return self.table.token_for(role)
            except KeyError:
                continue
        return None

    def client(self, token: str | None) -> AsyncClient:
        c = self._clients.get(token)
        if c is None:
            root = self.cfg.policy_root_cert
            c = AsyncClient(
                self.cfg.policy_target,
                token,
                timeout_s=self.cfg.timeout_s,
                retry=RetryPolicy(attempts=3),
                root_certificates=root.read_bytes() if root else None,
                client_id="labelstudio",
            )
            self._clients[token] = c
            while len(self._clients) > MAX_CLIENTS:
                _, old = self._clients.popitem(last=False)
                asyncio.get_running_loop().create_task(old.close())
        else:
            self._clients.move_to_end(token)
        return c

    async def model_info(self, token: str | None) -> policy_pb2.ModelInfo:
        try:
            return await self.client(token).model_info()
        except aio.AioRpcError as e:
            raise _grpc_error(e) from None

    # ---- the labeling config -------------------------------------------------------------------

    def choices_task(self, label_config: object) -> ChoicesTask:
        if not isinstance(label_config, str):
            raise InvalidArgument("label_config must be the project's labeling config (XML)")
        task = self._configs.get(label_config)
        if task is None:
            task = parse_labeling_config(label_config)
            if len(self._configs) > 256:
                self._configs.clear()
            self._configs[label_config] = task
        return task

    @staticmethod
    def check_labels(task: ChoicesTask, info: policy_pb2.ModelInfo) -> None:
        served = {label.name for label in info.labels}
        if set(task.labels) != served:
            raise UnsupportedConfig(
                f"the project's choices {sorted(task.labels)[:20]} differ from the labels the served annotator "
                f"predicts {sorted(served)[:20]}: make the <Choice> values the model's labels"
            )

    def _use_label_studio(self, body: Mapping[str, Any]) -> None:
        """Without a configured Label Studio URL and token, use the ones /setup sends (the project
        owner's token, kept in memory only)."""
        if self._ls_from_config:
            return
        host, token = body.get("hostname"), body.get("access_token")
        if isinstance(host, str) and host.startswith(("http://", "https://")) and isinstance(token, str) and token:
            if self._ls is None or self._ls.url != host.rstrip("/"):
                self._ls = LabelStudioAPI(host, token)

    # ---- the protocol --------------------------------------------------------------------------

    async def setup(self, body: Mapping[str, Any], token: str | None) -> dict[str, Any]:
        project = protocol.project_id(body.get("project"))
        task = self.choices_task(body.get("schema"))
        info = await self.model_info(token)
        self.check_labels(task, info)
        self.projects[project] = task
        self._use_label_studio(body)
        self.serving_version = self.serving_version or info.annotator_version
        return {"model_version": info.annotator_version}

    async def predict(self, body: Mapping[str, Any], token: str | None) -> dict[str, Any]:
        project = protocol.project_id(body.get("project"))
        task = self.choices_task(body.get("label_config"))
        info = await self.model_info(token)
        self.check_labels(task, info)
        self.projects.setdefault(project, task)
        tasks = body.get("tasks")
        if isinstance(tasks, list) and len(tasks) > self.cfg.max_tasks_per_request:
            raise TooManyTasks(f"{len(tasks)} tasks in one request; the limit is {self.cfg.max_tasks_per_request}")
        texts = protocol.tasks_texts(tasks, task, info.max_text_chars or 20_000)
        predictions = await self.annotate(project, [t for t in texts if t.text is not None], info, token)
        version = info.annotator_version
        results = [protocol.prediction_json(predictions.get(t.task_id), task, version) for t in texts]
        skipped = sum(t.text is None for t in texts)
        if skipped:
            logger.info("predict: %d of %d tasks of project %d have no text to label", skipped, len(texts), project)
        return {"results": results, "model_version": version}

    async def annotate(
        self, project: int, texts: list[protocol.TaskText], info: policy_pb2.ModelInfo, token: str | None
    ) -> dict[int, protocol.Prediction]:
        out: dict[int, protocol.Prediction] = {}
        for chunk in protocol.chunks(texts, info.max_items_per_request or 256):
            try:
                resp = await self.client(token).annotate([(str(t.task_id), t.text or "") for t in chunk])
            except aio.AioRpcError as e:
                raise _grpc_error(e) from None
            for a in resp.annotations:
                top = a.labels[0]
                p = protocol.Prediction(a.event_id, top.label, float(top.score), resp.model_version)
                out[int(a.item_id)] = p
                self.events.add(a.event_id, Served(top.label, resp.model_version, project, int(a.item_id)))
        return out

    async def webhook(self, body: Mapping[str, Any], token: str | None) -> dict[str, Any]:
        action = body.get("action")
        if action in ANNOTATION_ACTIONS:
            return await self.annotation(body, token)
        if action == "START_TRAINING":
            project = body.get("project")
            return self.start_training(protocol.project_id(project) if project is not None else None)
        return {"status": "ignored", "action": str(action)[:64]}

    async def train(self, body: Mapping[str, Any], token: str | None) -> dict[str, Any]:
        project = body.get("project")
        return self.start_training(protocol.project_id(project) if project not in (None, "", {}) else None)

    def start_training(self, project: int | None) -> dict[str, Any]:
        request_round(self.cfg.trainer_path, ANNOTATOR_MODEL, f"labelstudio project {project}")
        logger.info("round of %s requested from Label Studio (project %s)", ANNOTATOR_MODEL, project)
        return {"status": "round requested", "model": ANNOTATOR_MODEL}

    async def annotation(self, body: Mapping[str, Any], token: str | None) -> dict[str, Any]:
        annotation = body.get("annotation")
        raw_task = body.get("task")
        task_json: Mapping[str, Any] = raw_task if isinstance(raw_task, Mapping) else {}
        if not isinstance(annotation, Mapping):
            raise InvalidArgument("the webhook has no annotation object")
        if annotation.get("was_cancelled"):
            return {"status": "ignored", "reason": "skipped task"}
        project = protocol.project_id(annotation.get("project", body.get("project", task_json.get("project"))))
        task = await self.project_task(project)
        submitted = protocol.submitted_label(annotation, task_json, task)
        event_id, served = await self.served_for(submitted, task)
        key = protocol.idempotency_key(submitted)
        if submitted.label == served:
            event = fb.FeedbackEvent(
                idempotency_key=key,
                annotator_id=submitted.annotator,
                accept=fb.LabelAccept(event_id=event_id, label=submitted.label),
            )
        else:
            event = fb.FeedbackEvent(
                idempotency_key=key,
                annotator_id=submitted.annotator,
                correction=fb.LabelCorrection(event_id=event_id, label=submitted.label),
            )
        try:
            resp = await self.client(token).submit([event])
        except aio.AioRpcError as e:
            raise _grpc_error(e) from None
        r = resp.results[0]
        kind = event.WhichOneof("kind")
        return {"status": "accepted", "kind": kind, "event_id": event_id, "duplicate": r.duplicate, "seq": r.seq}

    async def project_task(self, project: int) -> ChoicesTask:
        task = self.projects.get(project)
        if task is not None:
            return task
        if self._ls is None:
            raise FailedPrecondition(f"project {project} is not set up: connect loopserve as its ML backend first")
        stored = await asyncio.to_thread(self._ls.project, project)
        task = self.choices_task(stored.get("label_config"))
        self.projects[project] = task
        return task

    async def served_for(self, s: protocol.SubmittedLabel, task: ChoicesTask) -> tuple[str, str]:
        """(event_id, served label) of the prediction the annotation judges: the region id Label
        Studio kept from our prediction, else its parent prediction, else the task's newest one."""
        for rid in s.region_ids:
            if protocol.EVENT_ID.match(rid):
                known = self.events.get(rid)
                if known is not None:
                    return rid, known.label
                for p in await self._task_predictions(s.task_id):
                    found = protocol.prediction_event(p, task)
                    if found and found[0] == rid:
                        return found
        if s.parent_prediction is not None and self._ls is not None:
            found = protocol.prediction_event(await asyncio.to_thread(self._ls.prediction, s.parent_prediction), task)
            if found:
                return found
        ours = [(p.get("id") or 0, protocol.prediction_event(p, task)) for p in await self._task_predictions(s.task_id)]
        ours = [(pid, ev) for pid, ev in ours if ev]
        if ours:
            return max(ours, key=lambda x: x[0])[1]  # type: ignore[return-value]
        latest = self.events.latest(s.project_id, s.task_id)
        if latest is not None:
            served = self.events.get(latest)
            if served is not None:
                return latest, served.label
        raise FailedPrecondition(f"task {s.task_id} has no loopserve prediction for this annotation to judge")

    async def _task_predictions(self, task_id: int) -> list[dict[str, Any]]:
        if self._ls is None:
            return []
        return await asyncio.to_thread(self._ls.task_predictions, task_id)

    # ---- fresh predictions after a swap ----------------------------------------------------------

    async def start(self) -> None:
        if self.cfg.refresh_interval_s > 0:
            self._watch = asyncio.get_running_loop().create_task(self._watch_version())

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            try:
                await self._watch
            except asyncio.CancelledError:
                pass
        for c in self._clients.values():
            await c.close()
        self._clients.clear()
        if self._ls is not None:
            self._ls.close()

    async def _watch_version(self) -> None:
        from loopserve.labelstudio.refresh import refresh_project

        policy_down = False
        failed: set[tuple[int, str]] = set()  # (project, version) whose refresh failed and was logged
        while True:
            await asyncio.sleep(self.cfg.refresh_interval_s)
            try:
                info = await self.model_info(self.background_token())
            except GrpcCallError as e:
                if not policy_down:  # once per outage, not every interval
                    logger.warning("swap watch: policy service answered %s; retrying", e.code)
                policy_down = True
                continue
            policy_down = False
            version = info.annotator_version
            if version != self.serving_version:
                logger.info("annotator version %s -> %s", self.serving_version or "(none)", version)
                self.serving_version = version
            if self._ls is None:
                continue
            for project, task in list(self.projects.items()):
                if self.fresh.get(project) == version:
                    continue
                t0 = time.perf_counter()
                try:
                    stats = await refresh_project(self, self._ls, project, task, info)
                except Exception as e:  # Label Studio or the policy service down: retry at the next check
                    if (project, version) not in failed:
                        logger.warning(
                            "refresh of project %d to %s failed (%s); retrying", project, version, type(e).__name__
                        )
                        failed.add((project, version))
                    continue
                self.fresh[project] = version
                self.refreshes += 1
                logger.info(
                    "project %d: %d stale predictions re-predicted by %s, %d annotated tasks keep theirs (%.1fs)",
                    project,
                    stats.refreshed,
                    version,
                    stats.annotated_stale,
                    time.perf_counter() - t0,
                )
