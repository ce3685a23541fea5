"""ModelStore: versioned model folders on local disk or a shared volume.

Layout (DESIGN.md):

    <root>/models/<model>/<version>/      safetensors weights, config, tokenizer, manifest.json
    <root>/models/<model>/LATEST          the newest published version's name
    <root>/models/<model>/.tmp-*          a publish in progress (removed on the next open)

A version is written under a temporary name, fsynced, renamed into place, and only then is LATEST
replaced (write a temp file, fsync, rename), so a reader never sees half a version. Versions are named
``v<N>`` with N increasing and never reused, even after a prune.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopserve.errors import NotFoundError, VerificationError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "LATEST"
_VERSION_RE = re.compile(r"^v(\d+)$")
_TMP_PREFIX = ".tmp-"
# Never look inside these when hashing or copying: they are the store's own bookkeeping.
_SKIP = {MANIFEST}


def version_number(version: str) -> int:
    m = _VERSION_RE.match(version)
    if not m:
        raise NotFoundError(f"not a version name: {version!r} (expected v<N>, e.g. v3)")
    return int(m.group(1))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}{_owner_tag()}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class Manifest:
    """What manifest.json holds for one version."""

    model: str
    version: str
    parent: str | None
    created: str
    files: dict[str, str]  # relative path -> sha256
    metrics: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. label set, base model, objective

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


def _owner_tag() -> str:
    return f"~{socket.gethostname()}~{os.getpid()}~{uuid.uuid4().hex[:8]}"


def _abandoned(tmp: Path, stale_after_s: float = 3600.0) -> bool:
    """A temp entry is abandoned when its writer (same host) is dead, or it is old (other hosts)."""
    parts = tmp.name.split("~")
    if len(parts) == 4 and parts[1] == socket.gethostname() and parts[2].isdigit():
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    try:
        return time.time() - tmp.stat().st_mtime > stale_after_s
    except FileNotFoundError:
        return False


class ModelStore:
    """A directory of versioned models. Safe for one publisher and many readers per model."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.models_dir = self.root / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self._clean_leftovers()

    # ---- reading -------------------------------------------------------------------------------

    def models(self) -> list[str]:
        return sorted(p.name for p in self.models_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def list(self, model: str) -> list[str]:
        """Whole versions of `model`, oldest first."""
        d = self.models_dir / model
        if not d.is_dir():
            return []
        versions = [
            p.name for p in d.iterdir() if _VERSION_RE.match(p.name) and (p / MANIFEST).is_file()
        ]
        return sorted(versions, key=version_number)

    def latest(self, model: str) -> str | None:
        """The version LATEST names, or None when nothing is published."""
        try:
            version = (self.models_dir / model / LATEST).read_text().strip()
        except FileNotFoundError:
            return None
        return version or None

    def path(self, model: str, version: str) -> Path:
        p = self.models_dir / model / version
        version_number(version)
        if not (p / MANIFEST).is_file():
            raise NotFoundError(f"model {model!r} has no version {version!r}")
        return p

    def get(self, model: str, version: str) -> Manifest:
        return Manifest.from_json((self.path(model, version) / MANIFEST).read_text())

    def verify(self, model: str, version: str) -> Manifest:
        """Check every file against the manifest's sha256; raise VerificationError on a mismatch."""
        path = self.path(model, version)
        manifest = self.get(model, version)
        for rel, digest in manifest.files.items():
            f = path / rel
            if not f.is_file():
                raise VerificationError(f"{model} {version}: file {rel} is missing")
            if sha256_file(f) != digest:
                raise VerificationError(f"{model} {version}: checksum mismatch in {rel}")
        return manifest

    # ---- writing -------------------------------------------------------------------------------

    def next_version(self, model: str) -> str:
        d = self.models_dir / model
        highest = -1
        marker = d / ".highest"
        with contextlib.suppress(FileNotFoundError, ValueError):
            highest = int(marker.read_text().strip())
        for v in self.list(model):
            highest = max(highest, version_number(v))
        return f"v{highest + 1}"

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
    ) -> Manifest:
        """Copy the files of `src` into a new version of `model` and (by default) point LATEST at it."""
        src = Path(src)
        if not src.is_dir():
            raise NotFoundError(f"no such folder: {src}")
        model_dir = self.models_dir / model
        model_dir.mkdir(parents=True, exist_ok=True)
        version = version or self.next_version(model)
        final = model_dir / version
        if final.exists():
            raise VerificationError(f"{model} {version} already exists; versions are never reused")
        tmp = model_dir / f"{_TMP_PREFIX}{version}{_owner_tag()}"
        tmp.mkdir()
        try:
            files: dict[str, str] = {}
            for f in sorted(src.rglob("*")):
                rel = f.relative_to(src).as_posix()
                if f.is_dir() or rel in _SKIP or rel.startswith(_TMP_PREFIX):
                    continue
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dest)
            for rel, data in extra_files:
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
            for f in sorted(tmp.rglob("*")):
                if f.is_file():
                    with f.open("rb") as fh:
                        os.fsync(fh.fileno())
                    files[f.relative_to(tmp).as_posix()] = sha256_file(f)
            manifest = Manifest(
                model=model,
                version=version,
                parent=parent,
                created=dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                files=files,
                metrics=dict(metrics or {}),
                meta=dict(meta or {}),
            )
            (tmp / MANIFEST).write_text(manifest.to_json())
            with (tmp / MANIFEST).open("rb") as fh:
                os.fsync(fh.fileno())
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _fsync_dir(model_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _write_atomic(model_dir / ".highest", str(version_number(version)).encode())
        if set_latest:
            self.set_latest(model, version)
        logger.info("published %s %s (%d files)", model, version, len(files))
        return manifest

    def set_latest(self, model: str, version: str) -> None:
        self.path(model, version)
        _write_atomic(self.models_dir / model / LATEST, version.encode())

    def prune(self, model: str, keep: int, protect: Iterable[str] = ()) -> list[str]:
        """Delete all but the newest `keep` versions, never LATEST or a version in `protect`
        (the serving and pinned ones). Returns what was removed."""
        versions = self.list(model)
        keepers = set(versions[-keep:]) if keep > 0 else set()
        keepers |= set(protect)
        latest = self.latest(model)
        if latest:
            keepers.add(latest)
        removed = []
        for v in versions:
            if v in keepers:
                continue
            victim = self.models_dir / model / v
            trash = victim.with_name(f"{_TMP_PREFIX}rm{v}{_owner_tag()}")
            os.rename(victim, trash)  # atomic: readers see the version whole or not at all
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(v)
        return removed

    def _clean_leftovers(self) -> None:
        """Remove what a publisher killed mid-write left behind, never a publish still in progress
        (another process may be publishing while this one opens the store)."""
        for model_dir in self.models_dir.iterdir():
            if not model_dir.is_dir():
                continue
            for p in model_dir.iterdir():
                if p.name.startswith(_TMP_PREFIX) and _abandoned(p):
                    logger.info("removing leftover %s/%s", model_dir.name, p.name)
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
