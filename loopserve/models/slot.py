"""ModelSlot: the one model a service serves, and how it is replaced without dropping a request.

A swap (watch of the store's LATEST, or ModelAdmin.LoadVersion) loads the new version beside the old
one and verifies it (loopserve/models/verify.py): checksums against the manifest (once, in the pass
that reads each file for loading: `VersionReader`), every tensor finite, every parameter present with
the right shape, the runtime's checks (label set unchanged unless declared, a smoke batch with finite
outputs), the same tensors as the version it replaces. What the new version shares with the serving
one byte for byte (same digest: the encoder of a head-only update, an unchanged tokenizer) is reused
as it is, not read again, so a head-only version swaps in milliseconds. Only then does one reference assignment
switch the slot, so the switch falls between batches: a request holds the `Loaded` handle it was
admitted under, the batcher never mixes handles in a batch, and requests in flight finish on the
version they started with. A version that fails is refused: the old one keeps serving, the refusal is
counted in `loopserve_swaps_total{result="failed"}`, and a log line says why.

Memory: at most two copies of a model at once. Loads run one at a time on the slot's own loader thread,
and a load first waits until the copy retired by the previous swap has been freed by its last request
(tracked with a weak reference), so the copies alive are the serving one and the one being loaded. On a
GPU the runtimes' loaders stage the new copy in host memory (safetensors -> CPU tensors -> a module
built without random init) and move it to the device in one `.to(device)` at the end of the load; the
device holds old + new from then until the retired copy's last request ends (the smoke batch runs on
the device), never a third copy, and the caching allocator reuses the retired copy's blocks (same
shapes) for the next version.

The watch is pushed, with polling as the fallback: a file-system watch on the model's folder (watchfiles:
inotify on Linux) wakes it the moment LATEST is replaced, and it also polls every `interval_s`, because
a network file system may deliver no events. Unpin wakes it too. It is edge-triggered: it loads
LATEST when LATEST *changes*, so a version pushed with
LoadVersion keeps serving until the next publish. Pin holds a version against the watch; Unpin hands
the slot back to the watch (which then serves LATEST); Rollback serves the version before the current
one and pins it, so the watch does not bring the rolled-back version straight back.

Two-phase publish (loopserve/models/staging.py): a version written to the store above LATEST is a
candidate. The watch (woken by the version folder's rename into place) stages it: loads and verifies it
beside the serving one exactly as a swap would, without switching, and says so in its hold record. The
publisher waits for the services that follow LATEST to have staged it (or refused it: then it withdraws
the version), then moves LATEST, and each service switches in one reference assignment: new weights
answer within a batch of the publish, on every replica at once. Staging first waits for the retired
copy like a load, so the bound of two copies holds; a candidate withdrawn or superseded is dropped.

The slot also records in the store (`ModelStore.hold`) the versions it must keep (serving, pinned,
rollback target, staged) so that a prune in another process never deletes them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import watchfiles

from loopserve import heap, metrics
from loopserve.errors import FailedPrecondition, LoopserveError, NotFoundError, Unavailable, VerificationError
from loopserve.models.store import (
    HOLD_REFRESH_S,
    LATEST,
    Manifest,
    ModelStore,
    VersionReader,
    is_version_name,
    version_number,
)
from loopserve.models.verify import ARCHITECTURE_CHANGE, LABEL_SET_CHANGE, compare_tensors, declares

logger = logging.getLogger(__name__)

M = TypeVar("M")
T = TypeVar("T")

HISTORY_LIMIT = 32
REFUSALS_RECORDED = 16  # the newest refusals a slot writes into its hold record
# How often watchfiles' thread looks for new file-system events: the push path's added latency.
WATCH_STEP_MS = 10


@dataclass(frozen=True)
class Loaded(Generic[M]):
    """A loaded, verified version. Immutable: a swap makes a new one."""

    model_name: str
    version: str
    manifest: Manifest
    model: M


# loader(reader, serving) -> model: reads the version's weights through `reader` (checked against the
# manifest as they stream in) and may reuse parts of `serving` whose files are unchanged.
# check(new, old) raises VerificationError (label set, smoke batch).
Loader = Callable[[VersionReader, "Loaded[M] | None"], M]
Check = Callable[["Loaded[M]", "Loaded[M] | None"], None]


def _weak(loaded: Loaded[Any]) -> weakref.ref[Any]:
    try:
        return weakref.ref(loaded.model)
    except TypeError:  # a model type without weak references: track the handle instead
        return weakref.ref(loaded)


class ModelSlot(Generic[M]):
    """
    Args:
        name: the model's name in the store (annotator, generator, reward).
        loader: builds the model from a verified version folder.
        check: the runtime's checks of a loaded version against the serving one.
        retire_timeout_s: how long a load waits for the copy retired by the previous swap to be
            freed (its last request to finish) before it gives up with UNAVAILABLE; the watch retries.
        loader_nice: niceness added to the loader thread (Linux), so that hashing and loading yield
            the CPU to serving threads; 0 leaves it alone.
    """

    def __init__(
        self,
        name: str,
        store: ModelStore,
        loader: Loader[M],
        check: Check[M] | None = None,
        *,
        retire_timeout_s: float = 120.0,
        loader_nice: int = 0,
    ) -> None:
        self.name = name
        self.store = store
        self.loader = loader
        self.check = check
        self.retire_timeout_s = retire_timeout_s
        self.loader_nice = loader_nice
        self._current: Loaded[M] | None = None
        self._history: list[str] = []  # versions served before, newest last (for Rollback)
        self._pinned: str | None = None
        self._seen_latest: str | None = None  # the LATEST the watch last acted on
        self._failed: dict[str, str] = {}  # version -> why it was refused (the watch does not retry it)
        # A candidate above LATEST, loaded and verified against the serving version (`stage`). Every
        # switch goes through load_version, which takes it or lets it go, so it is always checked
        # against the version serving now.
        self._staged: Loaded[M] | None = None
        self._retiring: weakref.ref[Any] | None = None
        self._retiring_version = ""
        self._lock = threading.RLock()  # one load or state change at a time
        self._holder = store.holder_id()
        self._hold_written = 0.0
        self._hold_failed = False
        self._wake: Callable[[], object] | None = None  # wakes the running watch (thread-safe)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"swap-{name}", initializer=self._init_loader_thread
        )

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

    @property
    def failed(self) -> dict[str, str]:
        return dict(self._failed)

    @property
    def staged(self) -> str | None:
        staged = self._staged
        return staged.version if staged is not None else None

    # ---- the loader thread ---------------------------------------------------------------------

    def _init_loader_thread(self) -> None:
        if self.loader_nice > 0 and hasattr(os, "setpriority"):
            with contextlib.suppress(OSError):  # per-thread on Linux: the thread id is the "process"
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.loader_nice)

    async def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run a slot operation on the loader thread (never on the event loop), in arrival order."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kw))

    def close(self) -> None:
        """Stop the loader thread and drop this process's hold on versions in the store."""
        self._executor.shutdown(wait=True)
        with contextlib.suppress(OSError):
            self.store.release(self.name, self._holder)

    # ---- loading -------------------------------------------------------------------------------

    def _wait_for_retired(self) -> None:
        """Block until the copy retired by the last swap is freed: then at most two copies exist."""
        ref = self._retiring
        if ref is None:
            return
        start = time.monotonic()
        next_collect = 1.0
        while ref() is not None:
            waited = time.monotonic() - start
            if waited > self.retire_timeout_s:
                raise Unavailable(
                    f"{self.name} {self._retiring_version} still has requests in flight after "
                    f"{self.retire_timeout_s:.0f}s; loading another copy would hold three; retry later"
                )
            # A reference cycle (e.g. a traceback) may be all that keeps it alive, frozen with the startup
            # objects if it is the first version (loopserve.heap). Collected after 1, 2, 4, ... s, not
            # once (a collection returns at once, collecting nothing, while another thread's is under way)
            # and not every second (each one holds the GIL ~0.2 s while a long request legitimately keeps
            # the old copy in use).
            if waited > next_collect:
                heap.collect_all()
                next_collect *= 2
            time.sleep(0.002)
        self._retiring = None
        if time.monotonic() - start > 0.05:
            logger.info("%s %s freed after %.3fs", self.name, self._retiring_version, time.monotonic() - start)

    def _refuse(self, version: str, reason: str) -> VerificationError:
        logger.warning("refused %s %s: %s (still serving %s)", self.name, version, reason, self._serving_name())
        metrics.SWAPS.labels(self.name, "failed").inc()
        # Listed last: whoever sees the refusal in `failed` (ListVersions, a test) finds its log line and
        # its count already there.
        self._failed[version] = reason
        return VerificationError(f"{self.name} {version} refused: {reason}")

    def _serving_name(self) -> str:
        return self._current.version if self._current is not None else "nothing"

    def _prepare(self, version: str, folder: Path, cur: Loaded[M] | None) -> tuple[Loaded[M], str]:
        """Load and verify `version` (in `folder`) beside `cur` (no switch); returns it and what the
        load cost."""
        t0 = time.perf_counter()
        try:
            # One pass over the files: the loader reads the weights through `reader`, which hashes
            # them as they stream in; check_rest hashes the small files it did not read, and the
            # files it reused unread (same digest as the serving version's) need no reading at all.
            reader = self.store.reader(self.name, version)
            manifest = reader.manifest
            try:
                model = self.loader(reader, cur)
            except Exception:
                reader.check_rest()  # a corrupted small file is the root cause: report the mismatch
                raise
            reader.check_rest()
            t_load = time.perf_counter() - t0
            t2 = time.perf_counter()
            new = Loaded(self.name, version, manifest, model)
            del model
            if self.check is not None:
                self.check(new, cur)
            if cur is not None and not declares(manifest.meta, LABEL_SET_CHANGE, ARCHITECTURE_CHANGE):
                old_folder = self.store.path(self.name, cur.version)
                compare_tensors(folder, old_folder, new_name=version, old_name=cur.version)
        except NotFoundError as exc:  # pruned or renamed while we loaded it
            raise self._refuse(version, exc.message) from exc
        except LoopserveError as exc:
            raise self._refuse(version, exc.message) from exc
        except Exception as exc:  # a loader or check that fails in an unexpected way refuses too
            raise self._refuse(version, f"{type(exc).__name__}: {exc}") from exc
        cost = (
            f"read and checked {reader.bytes_read / 1e6:.1f} MB, reused {len(reader.reused_files)} files, "
            f"load {t_load:.3f}s, checks {time.perf_counter() - t2:.3f}s"
        )
        return new, cost

    def load_version(self, version: str, *, record_history: bool = True) -> Loaded[M]:
        """Load, verify and switch to `version` (blocking; call it on the loader thread via `call`).
        A version staged beside the serving one (`stage`) is switched to without loading it again."""
        with self._lock:
            cur = self._current
            if cur is not None and cur.version == version:
                return cur
            staged, self._staged = self._staged, None
            if staged is not None and staged.version == version:
                t0 = time.perf_counter()
                new, cost = staged, "staged before LATEST moved"
            else:
                del staged  # another version: let it go before loading
                folder = self.store.path(self.name, version)  # NOT_FOUND (not a refusal) for an unknown version
                self._wait_for_retired()
                t0 = time.perf_counter()
                new, cost = self._prepare(version, folder, cur)
            t3 = time.perf_counter()
            if cur is not None:
                if record_history:
                    self._history = [*self._history, cur.version][-HISTORY_LIMIT:]
                self._retiring = _weak(cur)
                self._retiring_version = cur.version
            self._current = new  # the switch: one reference assignment, between batches
            del cur  # the retired copy lives exactly as long as the requests that still hold it
            self._failed.pop(version, None)
            metrics.SWAPS.labels(self.name, "ok").inc()
            metrics.SWAP_SECONDS.labels(self.name).observe(t3 - t0)
            metrics.MODEL_VERSION.labels(self.name).set(version_number(version))
            logger.info("swapped %s to %s in %.3fs (%s)", self.name, version, t3 - t0, cost)
            self._write_hold()
            return new

    def stage(self, version: str) -> Loaded[M] | None:
        """Load and verify `version` beside the serving one without switching, so that a later
        load_version of it (LATEST moving to it) is one reference assignment. Returns the staged copy,
        or None when there is nothing to stage (pinned, not loaded yet, already serving it)."""
        with self._lock:
            cur = self._current
            if self._pinned is not None or cur is None or cur.version == version:
                return None
            staged = self._staged
            if staged is not None and staged.version == version:
                return staged
            self._staged = staged = None  # at most one staged copy: an older candidate goes first
            folder = self.store.path(self.name, version)  # NOT_FOUND: withdrawn before we got to it
            self._wait_for_retired()
            t0 = time.perf_counter()
            try:
                new, cost = self._prepare(version, folder, cur)
            except LoopserveError:
                self._write_hold()  # the publisher waiting on this version learns of the refusal
                raise
            self._staged = new
            metrics.SWAPS.labels(self.name, "staged").inc()
            logger.info("staged %s %s beside %s in %.3fs (%s)", self.name, version, cur.version,
                        time.perf_counter() - t0, cost)  # fmt: skip
            self._write_hold()
            return new

    def _drop_staged(self, reason: str) -> None:
        staged = self._staged
        if staged is not None:
            logger.info("dropped staged %s %s: %s", self.name, staged.version, reason)
            self._staged = None
            self._write_hold()

    def load_latest(self) -> Loaded[M]:
        with self._lock:
            latest = self.store.latest(self.name)
            if latest is None:
                raise NotFoundError(f"the store has no version of {self.name}; run `loopserve models pull`")
            loaded = self.load_version(latest)
            self._seen_latest = latest
            return loaded

    def rollback(self) -> Loaded[M]:
        """Serve the version that served before the current one, and pin it so the watch keeps it."""
        with self._lock:
            if not self._history:
                raise FailedPrecondition(f"{self.name} has no earlier version to roll back to")
            target = self._history[-1]
            loaded = self.load_version(target, record_history=False)
            self._history = self._history[:-1]
            self._pinned = target
            self._write_hold()
            logger.info("rolled %s back to %s (pinned)", self.name, target)
            return loaded

    def pin(self, version: str | None = None) -> str:
        """Hold `version` (default: the serving one) against the watch, loading it if needed."""
        with self._lock:
            version = version or self.current.version
            if version != self.current.version:
                self.load_version(version)
            self._pinned = version
            self._drop_staged("pinned")
            self._write_hold()
            logger.info("pinned %s to %s", self.name, version)
            return version

    def unpin(self) -> None:
        """Give the slot back to the watch: it serves LATEST from its next poll on."""
        with self._lock:
            if self._pinned is not None:
                logger.info("unpinned %s (was %s)", self.name, self._pinned)
            self._pinned = None
            self._seen_latest = None
            self._write_hold()
            wake = self._wake
            if wake is not None:
                wake()  # the watch acts on LATEST now, not at its next poll

    # ---- holds in the store --------------------------------------------------------------------

    def _write_hold(self) -> None:
        serving = self._current.version if self._current is not None else None
        keep = {v for v in (serving, self._pinned, self.previous) if v}
        # What a two-phase publisher waits for (loopserve/models/staging.py): whether this slot follows
        # LATEST at all (a watch runs, nothing pinned), what it staged, and what it refused.
        follows = self._wake is not None and self._pinned is None
        refused = dict(list(self._failed.items())[-REFUSALS_RECORDED:])
        try:
            self.store.hold(
                self.name,
                self._holder,
                keep,
                serving=serving,
                staged=self.staged,
                refused=refused,
                follows_latest=follows,
            )
            self._hold_written = time.monotonic()
        except OSError as exc:  # a read-only store still serves; prune just cannot see us
            if not self._hold_failed:
                logger.warning("could not record held versions of %s (prune cannot see them): %s", self.name, exc)
            self._hold_failed = True
            self._hold_written = time.monotonic()

    # ---- the watch -----------------------------------------------------------------------------

    def poll_once(self) -> bool:
        """Swap to the store's LATEST if it changed since the last poll and nothing is pinned, else
        stage the newest version above LATEST (a publish in its first phase). Returns True on a swap.
        A refused version is not retried until LATEST changes again."""
        with self._lock:
            if self._current is not None and time.monotonic() - self._hold_written > HOLD_REFRESH_S:
                self._write_hold()
            if self._pinned is not None:
                return False
            latest = self.store.latest(self.name)
            if latest is None:
                return False
            if latest != self._seen_latest:
                if latest in self._failed or (self._current is not None and self._current.version == latest):
                    self._seen_latest = latest
                    return False
                try:
                    self.load_version(latest)
                except Unavailable:
                    return False  # the retired copy is still in use: try again at the next poll
                except LoopserveError:
                    self._seen_latest = latest  # refused: counted and logged; the old version serves on
                    return False
                self._seen_latest = latest
                return True
            self._stage_candidate(latest)
            return False

    def _stage_candidate(self, latest: str) -> None:
        candidate = self.store.candidate(self.name)
        if self._staged is not None and self._staged.version != candidate:
            self._drop_staged(f"withdrawn or superseded (newest above LATEST {latest}: {candidate or 'none'})")
        if candidate is None or candidate in self._failed or self._current is None:
            return
        if version_number(candidate) <= version_number(self._current.version):
            return  # e.g. LoadVersion pushed a version newer than LATEST: serving it already
        with contextlib.suppress(Unavailable, LoopserveError):  # retried at the next poll / refused, recorded
            self.stage(candidate)

    async def watch(self, interval_s: float, stop: asyncio.Event, *, events: bool = True) -> None:
        """Act on LATEST until `stop` is set: at once when a file-system event says LATEST was
        replaced (`events`), and every `interval_s` in any case; loads run on the loader thread."""
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._wake = functools.partial(loop.call_soon_threadsafe, wake.set)
        listener = asyncio.create_task(self._listen(wake)) if events else None
        if self._current is not None:
            await self.call(self._write_hold)  # says "follows LATEST" to two-phase publishers
        try:
            while not stop.is_set():
                wake.clear()  # an event during the poll below sets it again: nothing is missed
                try:
                    await self.call(self.poll_once)
                except Exception:
                    logger.exception("watch of %s failed; retrying", self.name)
                waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
                try:
                    await asyncio.wait(waits, timeout=interval_s, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
        finally:
            self._wake = None
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener

    async def _listen(self, wake: asyncio.Event) -> None:
        """Set `wake` whenever LATEST in the model's folder is replaced (inotify on Linux)."""
        folder = self.store.model_folder(self.name)

        def is_latest(change: watchfiles.Change, path: str) -> bool:
            # LATEST replaced (switch), or a version renamed into place or away (stage, or drop it)
            name = os.path.basename(path)
            return name == LATEST or is_version_name(name)

        # watchfiles logs every batch of changes at INFO; the swap's own log line says what happened.
        logging.getLogger("watchfiles.main").setLevel(logging.WARNING)
        done = asyncio.Event()  # watchfiles sets it when cancelled, which ends its watcher thread
        try:
            async for _ in watchfiles.awatch(
                folder, watch_filter=is_latest, stop_event=done, recursive=False, step=WATCH_STEP_MS
            ):
                wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # e.g. out of inotify watches: the polling fallback carries on
            logger.warning(
                "no file-system events for %s (%s: %s); polling LATEST only", self.name, type(exc).__name__, exc
            )
        finally:
            done.set()


class SlotWatches:
    """A service's slots following the store's LATEST (`ModelSlot.watch` each, as tasks of the running
    event loop), and their release: what both frontends start and stop, in either engine."""

    def __init__(self, slots: dict[str, ModelSlot[Any]]) -> None:
        self.slots = slots
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, interval_s: float, events: bool = True) -> None:
        for slot in self.slots.values():
            self._tasks.append(asyncio.create_task(slot.watch(interval_s, self._stop, events=events)))

    async def stop(self) -> None:
        """End the watches (a load under way finishes first)."""
        self._stop.set()
        for t in self._tasks:
            await t
        self._tasks.clear()

    def close(self) -> None:
        for slot in self.slots.values():
            slot.close()  # stop its loader thread and release its hold on store versions
