"""Trainer checkpoints: the cursor and everything folded from the log up to it, written atomically.

Layout under `<data-dir>/trainer/`:

    CHECKPOINT                    the name of the current checkpoint (replaced atomically)
    ckpt-00000042/
        state.json                cursor, round, counts, baselines, RNG states, optimizer tags
        examples.jsonl            every training example, RL prompt and pooled item (JSON lines, no pickle)
        optim/<objective>.*       optimizer state (safetensors + JSON), tagged with its model version
    .tmp-ckpt-...                 a checkpoint being written (removed on the next start)
    LOCK                          held by the running trainer (one trainer per data dir)

Exactly once. Claim: whatever instant the trainer is killed at, after a restart every log record has
been folded into the trainer's state exactly once.

1. Invariant: the checkpoint that CHECKPOINT names holds a state S with cursor c such that S is the
   fold (trainer.consumer.ingest) of exactly the records with seq <= c, each once, in seq order.
   It holds because S and c are written together into one temporary folder, fsynced, renamed into
   place (atomic), and only then is CHECKPOINT replaced (write a temporary file, fsync, rename: atomic).
   A crash before the rename leaves a temporary folder that is ignored and removed; a crash between
   the two renames leaves CHECKPOINT naming the previous, complete checkpoint. So CHECKPOINT always
   names a complete checkpoint satisfying the invariant, or nothing (then S is empty and c = 0).
2. Restart: load S and c, then read the log with `read(after_seq=c)`. The log's contract (base.py)
   is that seqs only grow and a smaller seq never becomes visible after a larger one, so the records
   returned are exactly those not in S, once each, in order; `ingest` refuses a seq <= its cursor.
   Progress made after the last checkpoint was lost with the process, so folding those records again
   is their first fold into S: nothing is skipped and nothing is counted twice.
3. Models. Weights are not in the checkpoint: each round starts from the serving version in the model
   store. If the trainer dies after publishing version V but before its checkpoint, V was trained on
   records past c; after the restart they are folded into S once (they were not in it) and the next
   round starts from V. The replay buffer holds them once, as it holds every other verified label.
   Optimizer state is tagged with the version it belongs to and loaded only for a round that starts
   from that version, so Adam's moments are never paired with other weights.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import random
import shutil
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from loopserve.models.store import fsync_dir
from trainer.consumer import TrainerState
from trainer.examples import LabelExample, LabelOutcome, example_from_dict, example_to_dict
from trainer.optim import save_optimizer

logger = logging.getLogger(__name__)

POINTER = "CHECKPOINT"
STATE_FILE = "state.json"
EXAMPLES_FILE = "examples.jsonl"
OPTIM_DIR = "optim"
LOCK_FILE = "LOCK"
_PREFIX = "ckpt-"
_TMP = ".tmp-"


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _write_pointer(root: Path, name: str) -> None:
    tmp = root / f"{_TMP}{POINTER}-{os.getpid()}"
    tmp.write_text(name)
    _fsync_file(tmp)
    os.replace(tmp, root / POINTER)
    fsync_dir(root)


def current(root: Path) -> Path | None:
    """The folder of the current checkpoint, or None before the first one."""
    try:
        name = (root / POINTER).read_text().strip()
    except FileNotFoundError:
        return None
    folder = root / name
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{root / POINTER} names {name}, which is not a complete checkpoint")
    return folder


@contextlib.contextmanager
def exclusive(root: Path) -> Iterator[None]:
    """Hold the trainer lock of `root` (a second trainer on the same data dir would fork the state)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / LOCK_FILE).open("a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise RuntimeError(f"another trainer holds {root / LOCK_FILE}") from e
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ---- RNG -----------------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng(state: TrainerState, py_rng: random.Random, gen: torch.Generator) -> None:
    """Record the RNG states in `state` (the loop's Python RNG, its torch Generator, torch's global RNG)."""
    version, internal, gauss = py_rng.getstate()
    state.rng = {
        "python": [version, list(internal), gauss],
        "torch_generator": _b64(gen.get_state()),
        "torch_global": _b64(torch.get_rng_state()),
    }


def restore_rng(state: TrainerState, py_rng: random.Random, gen: torch.Generator) -> bool:
    """Put the recorded RNG states back; False when the state has none (a fresh start)."""
    if not state.rng:
        return False
    rng: dict[str, Any] = state.rng
    version, internal, gauss = rng["python"]
    py_rng.setstate((version, tuple(internal), gauss))
    gen.set_state(_unb64(rng["torch_generator"]))
    torch.set_rng_state(_unb64(rng["torch_global"]))
    return True


# ---- save / load ---------------------------------------------------------------------------------


def _state_json(state: TrainerState) -> dict[str, Any]:
    return {
        "cursor": state.cursor,
        "round": state.round,
        "checkpoint_id": state.checkpoint_id,
        "label_accepts": state.label_accepts,
        "label_rejects": state.label_rejects,
        "consumed": dict(state.consumed),
        "skipped": dict(state.skipped),
        "new_events": dict(state.new_events),
        "last_round_at": state.last_round_at,
        "optimizer_versions": state.optimizer_versions,
        "rng": state.rng,
    }


def save_checkpoint(
    root: Path,
    state: TrainerState,
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    *,
    keep: int = 2,
) -> Path:
    """Write `state` as the next checkpoint and make it current; returns its folder.

    `optimizers` are the objectives whose optimizer state changed this round (their version tags must
    already be in `state.optimizer_versions`); the others are carried over from the previous checkpoint
    by hard link."""
    root.mkdir(parents=True, exist_ok=True)
    previous = current(root)
    # A crash between the folder rename and the pointer update leaves a newer, orphaned folder: never
    # reuse its number (ids only grow, like the log's seqs).
    existing = [int(p.name[len(_PREFIX) :]) for p in root.iterdir() if p.name.startswith(_PREFIX)]
    state.checkpoint_id = max([state.checkpoint_id, *existing]) + 1
    name = f"{_PREFIX}{state.checkpoint_id:08d}"
    tmp = root / f"{_TMP}{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        optim_dir = tmp / OPTIM_DIR
        optim_dir.mkdir()
        optimizers = optimizers or {}
        for objective in list(state.optimizer_versions):
            if objective in optimizers:
                save_optimizer(optimizers[objective], optim_dir, objective)
            elif previous is not None and _carry_optimizer(previous / OPTIM_DIR, optim_dir, objective):
                pass
            else:
                del state.optimizer_versions[objective]
        # Private (0600): it holds users' texts (the labelled items, and the served items pooled for
        # self-training), as the log does.
        with os.fdopen(os.open(tmp / EXAMPLES_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            for ex in state.examples():
                out.write(json.dumps(example_to_dict(ex)) + "\n")
            for prompt, seq in state.prompts.items():
                out.write(json.dumps({"type": "prompt", "prompt": prompt, "seq": seq}) + "\n")
            for text, seq in state.items.items():
                out.write(json.dumps({"type": "item", "text": text, "seq": seq}) + "\n")
        (tmp / STATE_FILE).write_text(json.dumps(_state_json(state), indent=1))
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        fsync_dir(optim_dir)
        fsync_dir(tmp)
        final = root / name
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_pointer(root, name)
    _prune(root, keep=max(keep, 1), current_name=name)
    logger.info("checkpoint %s: cursor %d, round %d", name, state.cursor, state.round)
    return final


def _carry_optimizer(src: Path, dest: Path, objective: str) -> bool:
    files = [src / f"{objective}.safetensors", src / f"{objective}.json"]
    if not all(f.is_file() for f in files):
        return False
    for f in files:
        try:
            os.link(f, dest / f.name)  # same file system: free
        except OSError:
            shutil.copyfile(f, dest / f.name)
    return True


def _prune(root: Path, keep: int, current_name: str) -> None:
    done = sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX) and p.is_dir())
    for p in done[:-keep]:
        if p.name != current_name:
            shutil.rmtree(p, ignore_errors=True)


def clean_leftovers(root: Path) -> None:
    """Remove half-written checkpoints (call with the lock held: no other writer exists)."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(_TMP):
            logger.info("removing unfinished checkpoint %s", p.name)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def load_checkpoint(root: Path) -> tuple[TrainerState, Path | None]:
    """The current checkpoint's state and folder, or a fresh state and None."""
    folder = current(root)
    if folder is None:
        return TrainerState(), None
    d = json.loads((folder / STATE_FILE).read_text())
    state = TrainerState(
        cursor=int(d["cursor"]),
        round=int(d["round"]),
        checkpoint_id=int(d["checkpoint_id"]),
        label_accepts=int(d["label_accepts"]),
        label_rejects=int(d["label_rejects"]),
        consumed=Counter(d["consumed"]),
        skipped=Counter(d["skipped"]),
        new_events=Counter(d["new_events"]),
        last_round_at={k: float(v) for k, v in d["last_round_at"].items()},
        optimizer_versions=dict(d["optimizer_versions"]),
        rng=dict(d["rng"]),
    )
    with (folder / EXAMPLES_FILE).open() as f:
        for line in f:
            row = json.loads(line)
            if row["type"] == "prompt":
                state.prompts[row["prompt"]] = int(row["seq"])
                continue
            if row["type"] == "item":  # the unlabelled-item pool (self-training)
                state.items[row["text"]] = int(row["seq"])
                continue
            ex = example_from_dict(row)
            if isinstance(ex, LabelExample):
                state.labels[ex.event_id] = ex
            elif isinstance(ex, LabelOutcome):
                state.outcomes[ex.event_id] = ex
            else:
                {
                    "bandit": state.bandit,
                    "pair": state.pairs,
                    "rating": state.ratings,
                    "pointwise": state.pointwise,
                    "demonstration": state.demonstrations,
                    "completion": state.completions,
                }[row["type"]].append(ex)  # type: ignore[attr-defined]
    return state, folder
