"""ModelStore on disk: publish, list, get, latest, verify, prune, holds, and crash safety (a publisher
killed with kill -9 mid-write leaves only whole versions; the next open removes the leftover)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loopserve.errors import InvalidArgument, NotFoundError, VerificationError
from loopserve.models.store import ModelStore
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]


def folder(path: Path, seed: int = 0, size: int = 4096) -> Path:
    """A version-shaped folder: a weights file, a config and a tokenizer file in a subfolder."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(rng.randbytes(size))
    (path / "config.json").write_text(json.dumps({"seed": seed}))
    (path / "tok").mkdir(exist_ok=True)
    (path / "tok" / "tokenizer.json").write_text("{}")
    return path


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def _writing(model_dir: Path) -> bool:
    """A publisher's temporary version folder exists."""
    return any(p.name.startswith(".tmp-v") for p in model_dir.iterdir())


def test_publish_writes_a_whole_version_with_a_manifest_and_moves_latest(store: ModelStore, tmp_path: Path) -> None:
    src = folder(tmp_path / "src")
    m0 = store.publish_version("annotator", src)
    m1 = store.publish_version("annotator", src, parent="v0", metrics={"accuracy": 0.8}, meta={"objective": "ce"})
    assert (m0.version, m1.version) == ("v0", "v1")
    assert store.list("annotator") == ["v0", "v1"]
    assert store.latest("annotator") == "v1"
    got = store.get("annotator", "v1")
    assert got.parent == "v0" and got.metrics == {"accuracy": 0.8} and got.meta == {"objective": "ce"}
    assert got.created.endswith("+00:00")
    # The manifest holds the sha256 of every file, subfolders included.
    assert set(got.files) == {"model.safetensors", "config.json", "tok/tokenizer.json"}
    for rel, digest in got.files.items():
        assert hashlib.sha256((src / rel).read_bytes()).hexdigest() == digest
        assert (store.path("annotator", "v1") / rel).read_bytes() == (src / rel).read_bytes()
    assert store.verify("annotator", "v1") == got
    assert store.models() == ["annotator"]


def test_unknown_versions_and_models_are_not_found(store: ModelStore, tmp_path: Path) -> None:
    assert store.latest("annotator") is None and store.list("annotator") == []
    store.publish_version("annotator", folder(tmp_path / "src"))
    for version in ("v7", "latest", "../v0", ""):
        with pytest.raises(NotFoundError):
            store.path("annotator", version)
    with pytest.raises(NotFoundError):
        store.get("generator", "v0")
    with pytest.raises(NotFoundError, match="no such folder"):
        store.publish_version("annotator", tmp_path / "missing")
    for bad in ("../etc", ".hidden", "a/b", ""):
        with pytest.raises(InvalidArgument):
            store.publish_version(bad, tmp_path / "src")


def test_versions_are_ordered_and_never_reused_even_after_a_prune(store: ModelStore, tmp_path: Path) -> None:
    src = folder(tmp_path / "src")
    for _ in range(12):
        store.publish_version("m", src)
    assert store.list("m") == [f"v{i}" for i in range(12)]  # numeric order: v10 after v9
    store.prune("m", keep=2)
    assert store.list("m") == ["v10", "v11"]
    store.set_latest("m", "v10")  # LATEST may point back; the next number still moves forward
    assert store.publish_version("m", src).version == "v12"
    with pytest.raises(VerificationError, match="never reused"):
        store.publish_version("m", src, version="v3")
    assert store.publish_version("m", src, version="v20", set_latest=False).version == "v20"
    assert store.latest("m") == "v12"
    assert ModelStore(store.root).next_version("m") == "v21"


def test_verify_names_the_file_that_is_corrupted_missing_or_unlisted(store: ModelStore, tmp_path: Path) -> None:
    src = folder(tmp_path / "src")
    store.publish_version("m", src)
    weights = store.path("m", "v0") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=re.escape("checksum mismatch in model.safetensors")):
        store.verify("m", "v0")

    store.publish_version("m", src)
    (store.path("m", "v1") / "tok" / "tokenizer.json").unlink()
    with pytest.raises(VerificationError, match=re.escape("tok/tokenizer.json is missing")):
        store.verify("m", "v1")

    store.publish_version("m", src)
    (store.path("m", "v2") / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(VerificationError, match=re.escape("pytorch_model.bin is not in the manifest")):
        store.verify("m", "v2")


def test_prune_keeps_the_newest_latest_protected_and_held_versions(store: ModelStore, tmp_path: Path) -> None:
    src = folder(tmp_path / "src")
    for _ in range(8):
        store.publish_version("m", src)
    store.set_latest("m", "v5")
    holder = store.holder_id()
    store.hold("m", holder, ["v1", "v2"])  # e.g. a service serving v2 that may roll back to v1
    # A hold left by a process that is gone does not count (and is cleaned up).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = holder.split("~")[0]
    store.hold("m", f"{host}~{dead.stdout.strip()}~dead", ["v0"])
    assert store.held("m") == {"v1", "v2"}

    removed = store.prune("m", keep=2, protect=["v3"])
    assert removed == ["v0", "v4"]
    assert store.list("m") == ["v1", "v2", "v3", "v5", "v6", "v7"]
    store.release("m", holder)
    assert store.prune("m", keep=1) == ["v1", "v2", "v3", "v6"]
    assert store.list("m") == ["v5", "v7"] and store.latest("m") == "v5"


def test_concurrent_publishers_get_distinct_versions(store: ModelStore, tmp_path: Path) -> None:
    src = folder(tmp_path / "src")
    got: list[str] = []

    def publish() -> None:
        for _ in range(3):
            got.append(ModelStore(store.root).publish_version("m", src).version)

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(12)]
    assert all(store.verify("m", v) for v in got)


def test_a_reader_never_sees_a_partial_version(store: ModelStore, tmp_path: Path) -> None:
    src = folder(tmp_path / "src", size=2 << 20)
    store.publish_version("m", src)
    stop = threading.Event()
    checked: list[str] = []
    errors: list[BaseException] = []

    def read() -> None:
        reader = ModelStore(store.root)
        while not stop.is_set():
            try:
                latest = reader.latest("m")
                assert latest is not None
                reader.verify("m", latest)
                for v in reader.list("m"):
                    reader.verify("m", v)
                checked.append(latest)
            except BaseException as e:  # reported below
                errors.append(e)
                return

    t = threading.Thread(target=read)
    t.start()
    for _ in range(6):
        store.publish_version("m", src)
    stop.set()
    t.join()
    assert not errors, errors[0]
    assert checked


# ---- kill -9 in the middle of a publish ------------------------------------------------------------

PUBLISHER = """
import sys
from loopserve.models.store import ModelStore
store = ModelStore(sys.argv[1])
while True:
    store.publish_version("m", sys.argv[2], meta={"by": "the killed publisher"})
"""


def test_kill_9_during_publish_leaves_only_whole_versions_and_the_next_open_cleans_up(tmp_path: Path) -> None:
    root = tmp_path / "store"
    src = folder(tmp_path / "src", size=24 << 20)  # big enough that a kill usually lands mid-copy
    ModelStore(root).publish_version("m", src)
    seen_versions: list[str] = []
    leftovers_seen = 0
    for round_ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(root), str(src)], cwd=REPO)
        try:
            model_dir = root / "models" / "m"
            # Wait until the publisher is writing (its temporary folder exists), then kill it at
            # a different point of the write each round (the pause is the kill point, not a wait).
            wait_until(
                functools.partial(_writing, model_dir),
                60,
                "the publisher to start writing",
                interval_s=0.001,
            )
            time.sleep(0.02 * round_)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        leftovers = [p.name for p in model_dir.iterdir() if p.name.startswith(".tmp-")]
        leftovers_seen += bool(leftovers)
        # Readers (before any cleanup) see only whole versions, each matching its manifest.
        reader_view = ModelStore.__new__(ModelStore)
        reader_view.root, reader_view.models_dir = root, root / "models"
        for v in reader_view.list("m"):
            reader_view.verify("m", v)
        latest = reader_view.latest("m")
        assert latest is not None and reader_view.verify("m", latest)

        store = ModelStore(root)  # the next open removes what the killed publisher left
        assert not [p.name for p in model_dir.iterdir() if p.name.startswith(".tmp-")]
        versions = store.list("m")
        assert versions == sorted(set(versions), key=lambda v: int(v[1:]))
        assert set(seen_versions) <= set(versions)  # nothing whole was lost
        seen_versions = versions
    assert leftovers_seen >= 1, "no kill landed in the middle of a write"
    # After all that, publishing still works and takes a number never handed out before.
    highest = max(int(v[1:]) for v in seen_versions)
    assert int(ModelStore(root).publish_version("m", src).version[1:]) > highest


def test_a_publish_in_progress_in_a_live_process_is_not_cleaned(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = ModelStore(root)
    store.publish_version("m", folder(tmp_path / "src"))
    live = root / "models" / "m" / f".tmp-v1{'~'}{store.holder_id()}"  # our own pid: alive
    live.mkdir()
    ModelStore(root)
    assert live.is_dir()
    assert ModelStore(root).list("m") == ["v0"]


# ---- safetensors parsed from the checked buffer ------------------------------------------------------


def _with_header(header: dict, data: bytes) -> bytearray:
    raw = json.dumps(header).encode()
    return bytearray(struct.pack("<Q", len(raw)) + raw + data)


def test_tensors_parsed_from_the_checked_buffer_equal_the_safetensors_library_and_garbage_is_refused(
    tmp_path: Path,
) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from loopserve.models.weights import parse_safetensors, read_tensors

    state = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2).bfloat16()}
    save_file(state, str(tmp_path / "w.safetensors"))
    got, want = read_tensors(tmp_path / "w.safetensors"), load_file(str(tmp_path / "w.safetensors"))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)

    eight = bytes(8)
    cases = {
        "too short": bytearray(b"\x01\x02"),
        "header of": bytearray(struct.pack("<Q", 1 << 40)),
        "not JSON": bytearray(struct.pack("<Q", 3) + b"{{{"),
        "bad dtype": _with_header({"x": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, eight),
        "do not fit its shape": _with_header({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, eight),
        "gap or an overlap": _with_header(
            {
                "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            eight,
        ),
        "bytes after the last tensor": _with_header(
            {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, eight
        ),
        "offsets do not fit": _with_header({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, eight),
    }
    for why, buf in cases.items():
        with pytest.raises(VerificationError, match="is not a readable safetensors file") as e:
            parse_safetensors(buf, "v9/w.safetensors")
        assert why in str(e.value), (why, str(e.value))
