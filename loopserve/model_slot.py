"""ModelSlot: the one model a service serves, and how it is replaced without dropping a request.

To swap, the slot loads the new version beside the old one (checksums against the manifest, every
parameter present with the right shape, the label set unchanged unless the manifest declares a change,
a smoke batch with finite outputs), then replaces one reference. Requests hold the handle they were
admitted under, so those in flight finish on their version; the old copy is freed when the last of them
finishes (at most two copies at once: loads are serialised). A failed load keeps the old version.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from loopserve import metrics
from loopserve.errors import FailedPrecondition, LoopserveError, NotFoundError, Unavailable, VerificationError
from loopserve.model_store import Manifest, ModelStore, version_number

logger = logging.getLogger(__name__)

M = TypeVar("M")


@dataclass(frozen=True)
class Loaded(Generic[M]):
    """A loaded, verified version. Immutable: a swap makes a new one."""

    model_name: str
    version: str
    manifest: Manifest
    model: M


# loader(folder, manifest) -> model; check(new, old) raises VerificationError; smoke(model) raises too.
Loader = Callable[[Path, Manifest], M]
Check = Callable[["Loaded[M]", "Loaded[M] | None"], None]


class ModelSlot(Generic[M]):
    def __init__(
        self,
        name: str,
        store: ModelStore,
        loader: Loader[M],
        check: Check[M] | None = None,
    ) -> None:
        self.name = name
        self.store = store
        self.loader = loader
        self.check = check
        self._current: Loaded[M] | None = None
        self._history: list[str] = []  # versions served before, newest last (for Rollback)
        self._pinned: str | None = None
        self._lock = threading.Lock()  # one load at a time: at most two copies in memory
        self._failed: set[str] = set()  # versions refused by verification (not retried by the watch)

    # ---- state ---------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._current is not None

    @property
    def current(self) -> Loaded[M]:
        cur = self._current
        if cur is None:
            raise Unavailable(f"{self.name} is not loaded yet")
        return cur

    @property
    def pinned(self) -> str | None:
        return self._pinned

    @property
    def previous(self) -> str | None:
        return self._history[-1] if self._history else None

    # ---- loading -------------------------------------------------------------------------------

    def load_version(self, version: str, *, record_history: bool = True) -> Loaded[M]:
        """Load, verify and switch to `version` (blocking; call off the event loop)."""
        with self._lock:
            cur = self._current
            if cur is not None and cur.version == version:
                return cur
            start = time.perf_counter()
            try:
                self.store.path(self.name, version)  # NOT_FOUND for an unknown version
                manifest = self.store.verify(self.name, version)
                model = self.loader(self.store.path(self.name, version), manifest)
                new = Loaded(self.name, version, manifest, model)
                if self.check is not None:
                    self.check(new, cur)
            except NotFoundError:
                metrics.SWAPS.labels(self.name, "failed").inc()
                raise
            except LoopserveError as exc:
                self._failed.add(version)
                metrics.SWAPS.labels(self.name, "failed").inc()
                logger.warning("refused %s %s: %s", self.name, version, exc.message)
                raise VerificationError(f"{self.name} {version} refused: {exc.message}") from exc
            except Exception as exc:
                self._failed.add(version)
                metrics.SWAPS.labels(self.name, "failed").inc()
                logger.warning("refused %s %s: %s", self.name, version, type(exc).__name__)
                raise VerificationError(f"{self.name} {version} refused: {type(exc).__name__}: {exc}") from exc
            if cur is not None and record_history:
                self._history.append(cur.version)
            self._current = new  # the switch: one reference assignment, between batches
            dt = time.perf_counter() - start
            metrics.SWAPS.labels(self.name, "ok").inc()
            metrics.SWAP_SECONDS.labels(self.name).observe(dt)
            metrics.MODEL_VERSION.labels(self.name).set(version_number(version))
            logger.info("swapped %s to %s in %.3fs", self.name, version, dt)
            return new

    def load_latest(self) -> Loaded[M]:
        latest = self.store.latest(self.name)
        if latest is None:
            raise NotFoundError(f"the store has no version of {self.name}; run `loopserve models pull`")
        return self.load_version(latest)

    def rollback(self) -> Loaded[M]:
        """Serve the version that served before the current one, and pin it so the watch keeps it."""
        if not self._history:
            raise FailedPrecondition(f"{self.name} has no earlier version to roll back to")
        target = self._history[-1]
        loaded = self.load_version(target, record_history=False)
        self._history.pop()
        self._pinned = target
        return loaded

    def pin(self, version: str | None = None) -> str:
        version = version or self.current.version
        if version != self.current.version:
            self.load_version(version)
        self._pinned = version
        return version

    def unpin(self) -> None:
        self._pinned = None

    # ---- the watch -----------------------------------------------------------------------------

    def poll_once(self) -> bool:
        """Swap to the store's LATEST if it changed and nothing is pinned. Returns True on a swap."""
        if self._pinned is not None:
            return False
        latest = self.store.latest(self.name)
        if latest is None or latest in self._failed:
            return False
        cur = self._current
        if cur is not None and cur.version == latest:
            return False
        try:
            self.load_version(latest)
        except LoopserveError:
            return False  # counted and logged; the old version keeps serving
        return True

    async def watch(self, interval_s: float, stop: asyncio.Event) -> None:
        """Poll LATEST every interval until `stop` is set; loads run on a thread beside serving."""
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.poll_once)
            except Exception:
                logger.exception("watch of %s failed; retrying", self.name)
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
            except TimeoutError:
                pass
