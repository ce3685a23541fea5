"""Prometheus collectors, declared once at module level on the process's one registry (DESIGN.md names).
Labels stay few and fixed: service, method, code, model, result, kind, objective."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

REQUESTS = Counter("loopserve_requests", "RPCs handled, by final status code.", ["service", "method", "code"])
REQUEST_SECONDS = Histogram(
    "loopserve_request_seconds",
    "RPC latency in seconds.",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_SIZE = Histogram(
    "loopserve_batch_size",
    "Items per model batch run by a batcher.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
QUEUE_DEPTH = Gauge("loopserve_queue_depth", "Items waiting in a queue.", ["queue"])
MODEL_VERSION = Gauge("loopserve_model_version", "Version number being served (v<N> -> N).", ["model"])
SWAPS = Counter(
    "loopserve_swaps",
    "Model swaps by result: ok (switched), failed (refused, the old version serves on), staged (a candidate "
    "loaded and verified beside the serving version before LATEST moved).",
    ["model", "result"],
)
SWAP_SECONDS = Histogram(
    "loopserve_swap_seconds",
    "Time to load, verify and switch to a new version (near zero when it was staged before LATEST moved).",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
FEEDBACK_EVENTS = Counter("loopserve_feedback_events", "Feedback events acknowledged (durable), by kind.", ["kind"])
FEEDBACK_REJECTED = Counter("loopserve_feedback_rejected", "Feedback events rejected, by status code.", ["code"])
FEEDBACK_WRITER_RESTARTS = Counter(
    "loopserve_feedback_writer_restarts", "Feedback writer processes started again after one exited unasked."
)
MODEL_FAULTS = Counter(
    "loopserve_model_faults", "Requests failed because a served model gave non-finite outputs.", ["model"]
)
MALFORMED_REQUESTS = Counter(
    "loopserve_malformed_requests", "Request bodies that did not parse as their message type.", ["service", "method"]
)
DECISIONS_LOGGED = Counter("loopserve_decisions_logged", "Decisions written to the feedback log.")
TRAINER_LAG = Gauge("loopserve_trainer_lag_events", "Log records not yet consumed by the trainer.")
TRAINER_LOSS = Gauge("loopserve_trainer_loss", "Last training loss, by objective.", ["objective"])
PUBLISH = Counter("loopserve_publish", "Trainer publish decisions, by result.", ["model", "result"])
ROUND_SECONDS = Histogram(
    "loopserve_trainer_round_seconds",
    "Duration of a learning round.",
    ["objective"],
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800),
)
EVENTS_SKIPPED = Counter(
    "loopserve_trainer_events_skipped", "Log events the trainer could not use, by reason.", ["reason"]
)


def serve_metrics(port: int, host: str = "0.0.0.0") -> Any:  # the trainer has no --host: all interfaces
    """Expose /metrics over HTTP on a daemon thread; returns the HTTP server (its `server_port` is the
    port bound, useful with port 0; `shutdown()` stops it), or None for a negative port."""
    if port < 0:
        return None
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    return server


def version_number_or_nan(version: str) -> float:
    try:
        return float(version.lstrip("v"))
    except ValueError:
        return float("nan")


# Shadow mode (policy_service/shadow.py): a candidate annotator answering copies of live traffic.
SHADOW_ITEMS = Counter(
    "loopserve_shadow_items", "Annotate items copied to the shadow candidate, by result.", ["result"]
)  # result: agree | disagree | dropped | failed
SHADOW_AGREEMENT = Gauge(
    "loopserve_shadow_agreement", "Share of shadow items where the candidate's top label equals serving's."
)
SHADOW_CONFIDENCE = Histogram(
    "loopserve_shadow_confidence",
    "The shadow candidate's top probability on the items it answered.",
    buckets=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
)
