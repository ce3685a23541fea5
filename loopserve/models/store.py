"""ModelStore: versioned model folders on local disk or a shared volume.

Layout (DESIGN.md):

    <root>/models/<model>/<version>/      safetensors weights, config, tokenizer, manifest.json
    <root>/models/<model>/LATEST          the newest published version's name
    <root>/models/<model>/.highest        the highest version number ever allocated (never reused)
    <root>/models/<model>/.lock           held (flock) by a publisher while it writes
    <root>/models/<model>/.holds/*.json   versions a live service serves, pins or may roll back to
    <root>/models/<model>/.tmp-*          a publish (or prune) in progress; removed on the next open
                                          once its writer is dead

A publish copies the files under a temporary name while hashing them, fsyncs them, writes
manifest.json (sha256 of every file, from that same pass), renames the folder into place and only
then replaces LATEST (write a temp file, fsync, rename). A reader therefore sees a version whole or not at all, and a
publisher killed with kill -9 at any point leaves only whole versions plus a `.tmp-*` leftover that the
next `ModelStore(...)` removes. Versions are named ``v<N>``; N is reserved in `.highest` before the
rename, so a number is never handed out twice, even after a crash or a prune.

A reader checks those digests once, as it reads (`VersionReader`): each file is streamed into the
reader's own buffer and hashed in the same pass, and the loader builds its tensors from exactly those
bytes; a file whose content equals one the service already holds in memory (same digest) is not read
at all.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopserve.errors import FailedPrecondition, InvalidArgument, NotFoundError, VerificationError, quote

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "LATEST"
HIGHEST = ".highest"
LOCK = ".lock"
HOLDS = ".holds"
_VERSION_RE = re.compile(r"^v(\d+)$")
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_TMP_PREFIX = ".tmp-"
_CHUNK = 4 << 20
# Streamed reads hash each chunk while it is still in the CPU cache.
_READ_CHUNK = 1 << 20
_HUGE_PAGE = 2 << 20
# A hold from another host counts while it was refreshed within this long (a live slot refreshes it
# every HOLD_REFRESH_S); a hold from this host counts while its process lives.
HOLD_TTL_S = 600.0
HOLD_REFRESH_S = 60.0


def version_number(version: str) -> int:
    m = _VERSION_RE.match(version)
    if not m:
        raise NotFoundError(f"not a version name: {quote(version)} (expected v<N>, e.g. v3)")
    return int(m.group(1))


def is_version_name(name: str) -> bool:
    return _VERSION_RE.match(name) is not None


def check_model_name(model: str) -> str:
    if not _MODEL_RE.match(model):
        raise InvalidArgument(f"bad model name {quote(model)}: use letters, digits, '_', '.', '-' (not first)")
    return model


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)  # hashlib drops the GIL for large buffers: serving threads keep running
    return h.hexdigest()


def _copy_hashing(src: Path, dest: Path) -> str:
    """Copy `src` to `dest`, fsync it, and return its sha256: one read of the source."""
    h = hashlib.sha256()
    with src.open("rb") as fin, dest.open("wb") as fout:
        for chunk in iter(lambda: fin.read(_CHUNK), b""):
            h.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (the directory's own fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _owner_tag() -> str:
    return f"~{socket.gethostname()}~{os.getpid()}~{uuid.uuid4().hex[:8]}"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}{_owner_tag()}")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _remove_version(folder: Path) -> None:
    """Delete a version folder (call under the publish lock)."""
    trash = folder.with_name(f"{_TMP_PREFIX}rm-{folder.name}{_owner_tag()}")
    os.rename(folder, trash)  # atomic: readers see the version whole or not at all
    shutil.rmtree(trash, ignore_errors=True)


def _process_alive(host: str, pid: str) -> bool | None:
    """True / False for a process on this host; None when it runs elsewhere (cannot tell)."""
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _abandoned(tmp: Path, stale_after_s: float = 3600.0) -> bool:
    """A temp entry is abandoned when its writer (same host) is dead, or it is old (other hosts)."""
    parts = tmp.name.split("~")
    if len(parts) == 4:
        alive = _process_alive(parts[1], parts[2])
        if alive is not None:
            return not alive
    try:
        return time.time() - tmp.stat().st_mtime > stale_after_s
    except FileNotFoundError:
        return False


@dataclass(frozen=True)
class Manifest:
    """What manifest.json holds for one version."""

    model: str
    version: str
    parent: str | None
    created: str
    files: dict[str, str]  # relative path -> sha256
    metrics: dict[str, float] = field(default_factory=dict)
    # e.g. label set, base model, objective; `label_set_change: true` allows a new label set.
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "model": self.model,
                "version": self.version,
                "parent": self.parent,
                "created": self.created,
                "files": self.files,
                "metrics": self.metrics,
                "meta": self.meta,
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        return cls(
            model=d["model"],
            version=d["version"],
            parent=d.get("parent"),
            created=d["created"],
            files=dict(d["files"]),
            metrics={k: float(v) for k, v in d.get("metrics", {}).items()},
            meta=dict(d.get("meta", {})),
        )


def file_buffer(size: int) -> bytearray | mmap.mmap:
    """Writable memory for a file's bytes. A large one is anonymous memory on transparent huge pages
    where the kernel allows it (madvise): filling a fresh 500 MB buffer of 4 KiB pages costs ~130k
    page faults, which took longer than reading and hashing the file (0.5 s against 0.18 s here)."""
    if size < _HUGE_PAGE:
        return bytearray(size)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # no MADV_HUGEPAGE (not Linux): 4 KiB pages
        buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


class VersionReader:
    """The files of one version, checked against its manifest once, as they are read.

    `read(rel)` streams a file into a buffer of its own, hashing every chunk as it arrives, and hands
    out those bytes only when the digest matches: what the loader parses is exactly what was hashed,
    even if the file changes on disk meanwhile, and no second pass reads the file again to check it.
    `shared(rels, other)` says that files are the very files (hard links) of `other`, the version being
    served: a loader that reuses what it built from them skips reading them.
    `check_rest()` then hashes whatever the loader neither read nor reused (config, tokenizer files)
    and refuses a missing or unlisted file, so a version is checked whole whichever loader runs.
    """

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        self.folder = folder
        self.manifest = manifest
        self.read_files: set[str] = set()
        self.reused_files: set[str] = set()
        self.bytes_read = 0

    def _digest(self, rel: str) -> str:
        digest = self.manifest.files.get(rel)
        if digest is None:
            raise VerificationError(f"{self.manifest.model} {self.manifest.version}: file {rel} is not in the manifest")
        return digest

    def read(self, rel: str) -> bytearray | mmap.mmap:
        """The bytes of `rel`, read once and hashed in the same pass; VerificationError on a mismatch."""
        digest = self._digest(rel)
        h = hashlib.sha256()
        try:
            with (self.folder / rel).open("rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                buf = file_buffer(size)
                view = memoryview(buf)
                pos = 0
                while pos < size:
                    n = f.readinto(view[pos : pos + _READ_CHUNK])
                    if not n:
                        break  # truncated while we read: the digest below refuses it
                    h.update(view[pos : pos + n])  # hashlib drops the GIL: serving threads keep running
                    pos += n
                if f.read(1):  # grew while we read
                    h.update(b"\0")
        except FileNotFoundError:
            raise VerificationError(f"{self.manifest.model} {self.manifest.version}: file {rel} is missing") from None
        view.release()
        if pos < size or h.hexdigest() != digest:
            raise VerificationError(f"{self.manifest.model} {self.manifest.version}: checksum mismatch in {rel}")
        self.read_files.add(rel)
        self.bytes_read += size
        return buf

    def shared(self, rels: Iterable[str], other: Manifest) -> bool:
        """True when every file in `rels` is the very file (same inode: a hard link made by a
        `shared_files` publish) that version `other` of the same model has, with the same digest.
        They then count as checked without being read: the caller reuses what it built from them
        when it loaded `other`, from bytes checked then. A copy (another inode) is read and checked."""
        rels = list(rels)
        for rel in rels:
            digest = self.manifest.files.get(rel)
            if digest is None or other.files.get(rel) != digest:
                return False
            try:
                if not os.path.samefile(self.folder / rel, self.folder.parent / other.version / rel):
                    return False
            except OSError:
                return False
        self.reused_files.update(rels)
        return True

    def unchanged_besides_weights(self, other: Manifest, *, ignore: Iterable[str] = ()) -> bool:
        """Every file but the weights (*.safetensors) and `ignore` has the digest it has in `other`,
        and no file was added or removed: config and tokenizer files are what `other` was built from,
        so its tokenizer can be reused. These small files are still hashed by `check_rest`."""
        skip = set(ignore)
        mine = {
            rel: d for rel, d in self.manifest.files.items() if not rel.endswith(".safetensors") and rel not in skip
        }
        theirs = {rel: d for rel, d in other.files.items() if not rel.endswith(".safetensors") and rel not in skip}
        return mine == theirs

    def check_rest(self) -> None:
        """Hash the files the loader neither read nor reused; refuse missing and unlisted files."""
        label = f"{self.manifest.model} {self.manifest.version}"
        if (self.folder.parent.name, self.folder.name) != (self.manifest.model, self.manifest.version):
            raise VerificationError(
                f"{self.folder.parent.name} {self.folder.name}: its manifest names {label} (folder renamed?)"
            )
        for rel, digest in sorted(self.manifest.files.items()):
            if rel in self.read_files or rel in self.reused_files:
                continue
            f = self.folder / rel
            if not f.is_file():
                raise VerificationError(f"{label}: file {rel} is missing")
            if sha256_file(f) != digest:
                raise VerificationError(f"{label}: checksum mismatch in {rel}")
        for f in self.folder.rglob("*"):
            rel = f.relative_to(self.folder).as_posix()
            if f.is_file() and rel != MANIFEST and rel not in self.manifest.files:
                raise VerificationError(f"{label}: file {rel} is not in the manifest")


class ModelStore:
    """A directory of versioned models: any number of readers, and publishers serialised per model
    by a file lock (so two trainers cannot both take v<N>)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.models_dir = self.root / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self._clean_leftovers()

    def _model_dir(self, model: str) -> Path:
        return self.models_dir / check_model_name(model)

    def model_folder(self, model: str) -> Path:
        """The folder holding `model`'s versions and its LATEST (what a watch of LATEST watches)."""
        return self._model_dir(model)

    # ---- reading -------------------------------------------------------------------------------

    def models(self) -> list[str]:
        return sorted(p.name for p in self.models_dir.iterdir() if p.is_dir() and _MODEL_RE.match(p.name))

    def list(self, model: str) -> list[str]:
        """Whole versions of `model`, oldest first."""
        d = self._model_dir(model)
        if not d.is_dir():
            return []
        versions = [p.name for p in d.iterdir() if _VERSION_RE.match(p.name) and (p / MANIFEST).is_file()]
        return sorted(versions, key=version_number)

    def latest(self, model: str) -> str | None:
        """The version LATEST names, or None when nothing is published."""
        try:
            version = (self._model_dir(model) / LATEST).read_text().strip()
        except FileNotFoundError:
            return None
        return version or None

    def candidate(self, model: str) -> str | None:
        """The newest version above LATEST (written, not yet published), or None."""
        versions = self.list(model)
        latest = self.latest(model)
        if not versions or (latest is not None and version_number(versions[-1]) <= version_number(latest)):
            return None
        return versions[-1]

    def path(self, model: str, version: str) -> Path:
        version_number(version)
        p = self._model_dir(model) / version
        if not (p / MANIFEST).is_file():
            known = ", ".join(self.list(model)[-5:]) or "none"
            raise NotFoundError(f"model {quote(model)} has no version {quote(version)} (newest: {known})")
        return p

    def get(self, model: str, version: str) -> Manifest:
        return Manifest.from_json((self.path(model, version) / MANIFEST).read_text())

    def verify(self, model: str, version: str) -> Manifest:
        """Check every file against the manifest's sha256, and that no file is missing or unlisted;
        raise VerificationError saying which file is wrong."""
        manifest = self.get(model, version)
        self.reader(model, version, manifest).check_rest()
        return manifest

    def reader(self, model: str, version: str, manifest: Manifest | None = None) -> VersionReader:
        """A reader that checks `version`'s files against its manifest as a loader reads them."""
        return VersionReader(self.path(model, version), manifest or self.get(model, version))

    # ---- writing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _publish_lock(self, model_dir: Path) -> Iterator[None]:
        with (model_dir / LOCK).open("a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released by the kernel if we are killed
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _highest(self, model: str) -> int:
        highest = -1
        with contextlib.suppress(FileNotFoundError, ValueError):
            highest = int((self._model_dir(model) / HIGHEST).read_text().strip())
        for v in self.list(model):
            highest = max(highest, version_number(v))
        return highest

    def next_version(self, model: str) -> str:
        return f"v{self._highest(model) + 1}"

    def publish_version(
        self,
        model: str,
        src: str | os.PathLike[str],
        *,
        parent: str | None = None,
        metrics: Mapping[str, float] | None = None,
        meta: Mapping[str, Any] | None = None,
        version: str | None = None,
        set_latest: bool = True,
        extra_files: Iterable[tuple[str, bytes]] = (),
        shared_files: Iterable[str] = (),
        if_latest: str | None = None,
    ) -> Manifest:
        """Copy the files of `src` into a new version of `model` and (by default) point LATEST at it.

        `shared_files`: files taken unchanged from `parent` (hard links, their digest from the parent's
        manifest): a head-only update shares the encoder's weights instead of writing 90 MB again.
        `if_latest`: publish only while LATEST is still this version (FailedPrecondition otherwise), so a
        cheap update computed on top of one version never buries a newer one published meanwhile."""
        src = Path(src)
        if not src.is_dir():
            raise NotFoundError(f"no such folder: {src}")
        model_dir = self._model_dir(model)
        model_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with self._publish_lock(model_dir):
            if if_latest is not None and self.latest(model) != if_latest:
                raise FailedPrecondition(f"{model}: LATEST moved from {if_latest} to {self.latest(model)}")
            highest = self._highest(model)
            if version is None:
                version = f"v{highest + 1}"
            elif version_number(version) <= highest:
                raise VerificationError(
                    f"{model} {version}: versions are never reused and v{highest} was already allocated"
                )
            final = model_dir / version
            tmp = model_dir / f"{_TMP_PREFIX}{version}{_owner_tag()}"
            tmp.mkdir()
            try:
                files: dict[str, str] = {}
                for f in sorted(src.rglob("*")):
                    rel = f.relative_to(src).as_posix()
                    if f.is_dir() or rel == MANIFEST or rel.startswith(_TMP_PREFIX):
                        continue
                    dest = tmp / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    files[rel] = _copy_hashing(f, dest)
                shared = list(shared_files)
                if shared:
                    if parent is None:
                        raise VerificationError("shared_files need a parent version")
                    parent_files = self.get(model, parent).files
                    for rel in shared:
                        if rel not in parent_files:
                            raise VerificationError(f"{model} {parent} has no file {rel} to share")
                        dest = tmp / rel
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        os.link(model_dir / parent / rel, dest)
                        files[rel] = parent_files[rel]
                for rel, data in extra_files:
                    dest = tmp / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(data)
                    with dest.open("rb") as fh:
                        os.fsync(fh.fileno())
                    files[rel] = hashlib.sha256(data).hexdigest()
                if not files:
                    raise NotFoundError(f"{src} holds no files to publish")
                manifest = Manifest(
                    model=model,
                    version=version,
                    parent=parent,
                    created=dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                    files=dict(sorted(files.items())),
                    metrics=dict(metrics or {}),
                    meta=dict(meta or {}),
                )
                with (tmp / MANIFEST).open("w") as fh:
                    fh.write(manifest.to_json())
                    fh.flush()
                    os.fsync(fh.fileno())
                for d in {p.parent for p in tmp.rglob("*")}:
                    fsync_dir(d)
                # Reserve the number first: a crash after this point burns it, never reuses it.
                _write_atomic(model_dir / HIGHEST, str(version_number(version)).encode())
                os.rename(tmp, final)  # the version appears whole, in one step
                fsync_dir(model_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if set_latest:
                self.set_latest(model, version)
        logger.info("published %s %s (%d files) in %.3fs", model, version, len(files), time.perf_counter() - start)
        return manifest

    def set_latest(self, model: str, version: str) -> None:
        self.path(model, version)
        _write_atomic(self._model_dir(model) / LATEST, version.encode())

    # ---- holds: what live services need kept --------------------------------------------------

    def hold(
        self,
        model: str,
        holder: str,
        versions: Iterable[str],
        *,
        serving: str | None = None,
        staged: str | None = None,
        refused: Mapping[str, str] | None = None,
        follows_latest: bool = False,
    ) -> None:
        """Record (replacing `holder`'s previous record) the versions a live service must keep:
        the one it serves, its pin, its rollback target. `prune` never removes a held version.
        `serving`: the one it serves; `staged`: a version not yet LATEST that the service has loaded
        and verified beside the serving one (it switches to it in one step when LATEST names it);
        `refused`: versions it refused, with why; `follows_latest`: its watch switches when LATEST
        moves (not pinned). A two-phase publisher (loopserve/models/staging.py) waits on those."""
        d = self._model_dir(model) / HOLDS
        d.mkdir(parents=True, exist_ok=True)
        body = {
            "versions": sorted(set(versions) | ({staged} if staged else set())),
            "serving": serving,
            "staged": staged,
            "refused": dict(refused or {}),
            "follows_latest": follows_latest,
            "updated": time.time(),
        }
        _write_atomic(d / f"{holder}.json", json.dumps(body).encode())

    def release(self, model: str, holder: str) -> None:
        (self._model_dir(model) / HOLDS / f"{holder}.json").unlink(missing_ok=True)

    def holds(self, model: str) -> dict[str, dict[str, Any]]:
        """The hold records of live services by holder; the records of dead ones are removed."""
        d = self._model_dir(model) / HOLDS
        out: dict[str, dict[str, Any]] = {}
        if not d.is_dir():
            return out
        for f in d.glob("*.json"):
            parts = f.stem.split("~")
            alive = _process_alive(parts[0], parts[1]) if len(parts) == 3 else None
            try:
                if alive is None:
                    alive = time.time() - f.stat().st_mtime < HOLD_TTL_S
                if not alive:
                    f.unlink(missing_ok=True)
                    continue
                out[f.stem] = json.loads(f.read_text())
            except (FileNotFoundError, ValueError):
                continue  # replaced or released while we looked
        return out

    def held(self, model: str) -> set[str]:
        """Versions held by live services."""
        return {v for record in self.holds(model).values() for v in record.get("versions", [])}

    def promote(self, model: str, version: str, *, if_latest: str | None = None) -> None:
        """Point LATEST at `version`, a version already in the store (the second phase of a staged
        publish); with `if_latest`, only while LATEST still names that version."""
        model_dir = self._model_dir(model)
        with self._publish_lock(model_dir):
            if if_latest is not None and self.latest(model) != if_latest:
                raise FailedPrecondition(f"{model}: LATEST moved from {if_latest} to {self.latest(model)}")
            self.set_latest(model, version)

    def discard(self, model: str, version: str) -> None:
        """Delete a version that never became LATEST (a staged candidate the publisher withdrew).
        Its number stays burnt: versions are never reused."""
        model_dir = self._model_dir(model)
        with self._publish_lock(model_dir):
            if self.latest(model) == version:
                raise FailedPrecondition(f"{model} {version} is LATEST; only a version never published is discarded")
            _remove_version(self.path(model, version))
        logger.info("discarded %s %s (never published)", model, version)

    @staticmethod
    def holder_id() -> str:
        """A holder name that says which process holds: `<host>~<pid>~<random>`."""
        return _owner_tag()[1:]

    def prune(self, model: str, keep: int, protect: Iterable[str] = ()) -> builtins.list[str]:
        """Delete all but the newest `keep` versions, never LATEST, a version in `protect`, or one a
        live service holds (serving, pinned or its rollback target). Returns what was removed."""
        model_dir = self._model_dir(model)
        with self._publish_lock(model_dir):
            versions = self.list(model)
            keepers = set(versions[-keep:]) if keep > 0 else set()
            keepers |= set(protect) | self.held(model)
            latest = self.latest(model)
            if latest:
                keepers.add(latest)
            removed = []
            for v in versions:
                if v in keepers:
                    continue
                _remove_version(model_dir / v)
                removed.append(v)
        if removed:
            logger.info("pruned %s: removed %d versions (%s)", model, len(removed), ", ".join(removed))
        return removed

    def _clean_leftovers(self) -> None:
        """Remove what a publisher killed mid-write left behind, never a publish still in progress
        (another process may be publishing while this one opens the store)."""
        for model_dir in self.models_dir.iterdir():
            if not model_dir.is_dir():
                continue
            holds = model_dir / HOLDS
            for p in [*model_dir.iterdir(), *(holds.iterdir() if holds.is_dir() else ())]:
                if p.name.startswith(_TMP_PREFIX) and _abandoned(p):
                    logger.info("removing leftover %s/%s", model_dir.name, p.name)
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):  # e.g. a read-only mount: readers skip it
                            p.unlink(missing_ok=True)
