"""Two-phase publish: write a version, wait until the services serving the model have it loaded and
verified beside the version they serve, then move LATEST so they all switch in one step.

A one-step publish moves LATEST the moment the files are in place; each service then reads, hashes,
builds and checks the new version (a quarter second for the annotator on two busy cores, seconds for
the generator) while its clients are still answered by the old one, and replicas switch whenever each
finishes. In two phases, that work happens before LATEST moves (ModelSlot.stage, the services' watch
acting on the new version folder), so the publish is followed within a batch by answers from the new
version on every replica, and a version a service refuses is withdrawn before anyone was told it was
published.

The services say what they staged or refused in their hold records in the store (ModelStore.hold):
the store is the one thing publishers and services share (a shared volume under Kubernetes), so no
publisher needs the services' addresses or the admin role. Only live holders whose watch follows
LATEST are waited for (a pinned service, or one without a watch, switches on its own terms anyway; a
record not refreshed for two refresh periods belongs to a service that is gone), and the wait is
bounded: when it runs out, LATEST moves and the services that were not ready load it as in a
one-step publish.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from loopserve.errors import FailedPrecondition, VerificationError, quote
from loopserve.models.store import HOLD_REFRESH_S, Manifest, ModelStore, version_number

logger = logging.getLogger(__name__)

POLL_S = 0.01  # how often the publisher reads the hold records while it waits


@dataclass
class Staging:
    """How the first phase went: which live holders that follow LATEST staged the version, refused
    it (with why), or were still loading it when the wait ended."""

    version: str
    staged: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    waiting: list[str] = field(default_factory=list)
    waited_s: float = 0.0
    superseded_by: str | None = None

    def as_metrics(self) -> dict[str, float]:
        return {
            "stage_wait_s": round(self.waited_s, 3),
            "staged_services": float(len(self.staged)),
            "unstaged_services": float(len(self.waiting)),
        }


def _followers(store: ModelStore, model: str) -> dict[str, dict[str, Any]]:
    # A follower rewrites its record every HOLD_REFRESH_S; one silent for two of those is gone (a pod on
    # another host whose liveness the store cannot check) and is not waited for.
    fresh_after = time.time() - 2 * HOLD_REFRESH_S
    return {
        h: r
        for h, r in store.holds(model).items()
        if r.get("follows_latest") and float(r.get("updated", 0)) >= fresh_after
    }


def wait_staged(
    store: ModelStore, model: str, version: str, timeout_s: float, *, stop: threading.Event | None = None
) -> Staging:
    """Block until every live holder of `model` that follows LATEST has staged `version` or refused
    it, or `timeout_s` passed (or `stop` is set)."""
    t0 = time.monotonic()
    while True:
        out = Staging(version)
        if (newest := store.candidate(model)) is not None and version_number(newest) > version_number(version):
            # Another publisher's newer version is above ours: services stage only the newest, so ours
            # would never be staged; it is loaded after LATEST moves, as in one step.
            out.superseded_by = newest
            out.waited_s = time.monotonic() - t0
            return out
        for holder, record in _followers(store, model).items():
            if version in record.get("refused", {}):
                out.refused[holder] = str(record["refused"][version])
            elif version in (record.get("staged"), record.get("serving")):
                out.staged.append(holder)  # staged, or already serving it (e.g. pushed by LoadVersion)
            else:
                out.waiting.append(holder)
        out.waited_s = time.monotonic() - t0
        if not out.waiting or out.waited_s >= timeout_s or (stop is not None and stop.is_set()):
            return out
        time.sleep(POLL_S)


def publish_staged(
    store: ModelStore,
    model: str,
    src: str | os.PathLike[str],
    *,
    stage_wait_s: float,
    if_latest: str | None = None,
    stop: threading.Event | None = None,
    **publish: Any,
) -> tuple[Manifest, Staging | None]:
    """Publish `src` as a new version of `model` in two phases (module docstring); `stage_wait_s` 0
    publishes in one step. `publish`: ModelStore.publish_version's other arguments.

    Raises VerificationError, after withdrawing the version, when a service refused it, and
    FailedPrecondition when `if_latest` no longer holds (before writing, or when LATEST moved while
    the services staged it: the version is withdrawn then too)."""
    if stage_wait_s <= 0:
        return store.publish_version(model, src, if_latest=if_latest, **publish), None
    manifest = store.publish_version(model, src, if_latest=if_latest, set_latest=False, **publish)
    version = manifest.version
    staging = wait_staged(store, model, version, stage_wait_s, stop=stop)
    if staging.refused:
        store.discard(model, version)
        holder, why = next(iter(staging.refused.items()))
        raise VerificationError(
            f"{model} {version} withdrawn: {len(staging.refused)} service(s) refused it (holder {quote(holder)}: {why})"
        )
    try:
        store.promote(model, version, if_latest=if_latest)
    except FailedPrecondition:
        store.discard(model, version)
        raise
    if staging.superseded_by:
        logger.info("published %s %s without waiting: %s is already above it", model, version, staging.superseded_by)
    elif staging.waiting:
        logger.warning(
            "published %s %s after waiting %.1fs for %d of %d services to stage it; the rest load it now",
            model, version, staging.waited_s, len(staging.waiting), len(staging.waiting) + len(staging.staged),
        )  # fmt: skip
    else:
        logger.info(
            "published %s %s in two phases: %d service(s) staged it in %.3fs",
            model, version, len(staging.staged), staging.waited_s,
        )  # fmt: skip
    return manifest, staging
