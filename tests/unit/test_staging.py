"""Two-phase publish, the publisher's side (loopserve/models/staging.py): it waits for the holders that
follow LATEST to stage the version, withdraws a version one refused, gives up waiting after its bound,
and the trainer's `--stage-wait-s` decides which way it publishes. The services' side (a real policy
service staging and switching) is in tests/service/test_hotswap.py; here the holders are hold records
written the way ModelSlot writes them."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from loopserve.errors import FailedPrecondition, VerificationError
from loopserve.models.staging import publish_staged, wait_staged
from loopserve.models.store import ModelStore
from tests.support.waiting import wait_until
from tests.unit.test_model_store import folder
from trainer.__main__ import read_args
from trainer.consumer import TrainerState
from trainer.rounds import Context, Publication, RoundResult, publish


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    s = ModelStore(tmp_path / "store")
    s.publish_version("m", folder(tmp_path / "base", seed=0))  # v0, LATEST
    return s


def follower(store: ModelStore, *, staged: str | None = None, refused: dict[str, str] | None = None) -> str:
    """A live holder (this process) serving v0 whose watch follows LATEST."""
    holder = store.holder_id()
    store.hold("m", holder, ["v0"], serving="v0", staged=staged, refused=refused, follows_latest=True)
    return holder


def counting_hold_reads(store: ModelStore) -> list[int]:
    """Count the publisher's reads of the hold records (a one-element list the test can watch)."""
    reads = [0]
    holds = store.holds

    def counted(model: str) -> dict[str, dict[str, object]]:
        reads[0] += 1
        return holds(model)

    store.holds = counted  # type: ignore[method-assign]
    return reads


def test_store_candidate_promote_and_discard(store: ModelStore, tmp_path: Path) -> None:
    assert store.candidate("m") is None
    v1 = store.publish_version("m", folder(tmp_path / "a", seed=1), parent="v0", set_latest=False).version
    assert store.candidate("m") == v1 and store.latest("m") == "v0"
    with pytest.raises(FailedPrecondition, match="LATEST moved from v9"):
        store.promote("m", v1, if_latest="v9")
    store.discard("m", v1)
    assert store.list("m") == ["v0"] and store.candidate("m") is None
    assert store.publish_version("m", folder(tmp_path / "b", seed=2), set_latest=False).version == "v2"  # v1 burnt
    store.promote("m", "v2", if_latest="v0")
    assert store.latest("m") == "v2" and store.candidate("m") is None
    with pytest.raises(FailedPrecondition, match="is LATEST"):
        store.discard("m", "v2")


def test_a_publish_waits_until_every_follower_staged_the_version_then_moves_latest(
    store: ModelStore, tmp_path: Path
) -> None:
    fast, slow = follower(store), follower(store)
    latest_when_staged: list[str | None] = []
    reads = counting_hold_reads(store)

    def services() -> None:  # stage the candidate as each slot would: fast at once, slow later
        wait_until(lambda: store.candidate("m") is not None, 30, "the version to be written")
        candidate = store.candidate("m")
        store.hold("m", fast, ["v0"], serving="v0", staged=candidate, follows_latest=True)
        seen = reads[0]
        # The slow one stages only once the publisher has read the records again after the fast one
        # staged: the publisher has then had its chance to move LATEST too early.
        wait_until(lambda: reads[0] >= seen + 2, 30, "the publisher to read the hold records again")
        latest_when_staged.append(store.latest("m"))
        store.hold("m", slow, ["v0"], serving="v0", staged=candidate, follows_latest=True)

    t = threading.Thread(target=services)
    t.start()
    manifest, staging = publish_staged(store, "m", folder(tmp_path / "a", seed=1), stage_wait_s=30, parent="v0")
    t.join()
    assert staging is not None
    assert sorted(staging.staged) == sorted([fast, slow]) and not staging.waiting and not staging.refused
    assert latest_when_staged == ["v0"], "LATEST moved before the slow service had staged the version"
    assert store.latest("m") == manifest.version == "v1"
    assert staging.waited_s > 0


def test_a_version_a_follower_refuses_is_withdrawn_and_latest_stays(store: ModelStore, tmp_path: Path) -> None:
    holder = follower(store, refused={"v1": "model.safetensors holds NaN or infinite values"})
    follower(store, staged="v1")
    with pytest.raises(VerificationError, match=r"m v1 withdrawn: 1 service\(s\) refused it .*NaN"):
        publish_staged(store, "m", folder(tmp_path / "a", seed=1), stage_wait_s=30, parent="v0")
    assert store.list("m") == ["v0"] and store.latest("m") == "v0"
    assert holder  # the refusal names its holder; the next version gets a new number
    assert store.publish_version("m", folder(tmp_path / "b", seed=2)).version == "v2"


def test_the_wait_is_bounded_and_only_followers_of_latest_are_waited_for(store: ModelStore, tmp_path: Path) -> None:
    stuck = follower(store)  # follows LATEST but never stages (e.g. still busy)
    store.hold("m", store.holder_id(), ["v0"], serving="v0", follows_latest=False)  # pinned: not waited for
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = store.holder_id().split("~")[0]
    store.hold("m", f"{host}~{dead.stdout.strip()}~gone", ["v0"], serving="v0", follows_latest=True)  # dead
    silent = store.model_folder("m") / ".holds" / "otherhost~1~pod.json"  # another host, not refreshed
    silent.write_text(json.dumps({"versions": ["v0"], "follows_latest": True, "updated": time.time() - 3600}))
    manifest, staging = publish_staged(store, "m", folder(tmp_path / "a", seed=1), stage_wait_s=0.3, parent="v0")
    assert staging is not None and staging.waiting == [stuck] and not staging.staged
    assert staging.waited_s >= 0.3  # the whole bound, then published anyway
    assert store.latest("m") == manifest.version  # published anyway: the stuck service loads it as before


def test_a_stop_request_ends_the_wait(store: ModelStore) -> None:
    follower(store)
    stop = threading.Event()
    stop.set()
    assert wait_staged(store, "m", "v1", 3600, stop=stop).waiting


def test_latest_moving_while_followers_stage_withdraws_the_version(store: ModelStore, tmp_path: Path) -> None:
    holder = follower(store)

    def meanwhile() -> None:  # another publisher moves LATEST while ours is being staged
        wait_until(lambda: store.candidate("m") is not None, 30, "our version to be written")
        store.publish_version("m", folder(tmp_path / "other", seed=3), parent="v0")
        store.hold("m", holder, ["v0"], serving="v0", staged="v1", follows_latest=True)

    t = threading.Thread(target=meanwhile)
    t.start()
    with pytest.raises(FailedPrecondition, match="LATEST moved from v0 to v2"):
        publish_staged(store, "m", folder(tmp_path / "a", seed=1), stage_wait_s=30, if_latest="v0", parent="v0")
    t.join()
    assert store.list("m") == ["v0", "v2"] and store.latest("m") == "v2"


@pytest.mark.parametrize("wait", ["0", "0.3"])
def test_the_trainers_stage_wait_flag_decides_how_a_round_publishes(
    store: ModelStore, tmp_path: Path, wait: str
) -> None:
    stuck = follower(store)
    args = read_args(["--data-dir", str(tmp_path), "--stage-wait-s", wait], environ={})
    assert args.stage_wait_s == float(wait)
    ctx = Context(args, store, torch.device("cpu"), None, random.Random(0), torch.Generator())
    result = RoundResult("m", "gated", serving="v0")
    src = folder(tmp_path / "candidate", seed=4)

    def save(dest: Path) -> None:
        for f in src.rglob("*"):
            if f.is_file():
                (dest / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                (dest / f.relative_to(src)).write_bytes(f.read_bytes())

    version = publish(ctx, TrainerState(), "m", "v0", Publication(save=save, meta={}), result)
    assert store.latest("m") == version == "v1"
    if wait == "0":  # one step: nothing waited for, nothing recorded
        assert "stage_wait_s" not in result.metrics
    else:
        assert result.metrics["unstaged_services"] == 1.0 and result.metrics["stage_wait_s"] >= 0.3
        assert stuck


def test_a_version_superseded_by_a_newer_candidate_is_not_waited_for(store: ModelStore, tmp_path: Path) -> None:
    follower(store)  # never stages anything: a wait would run to its bound
    store.publish_version("m", folder(tmp_path / "a", seed=1), set_latest=False)  # v1, another publisher's
    newer = store.publish_version("m", folder(tmp_path / "b", seed=2), set_latest=False).version
    staging = wait_staged(store, "m", "v1", 3600)  # returns at once (a hang would meet the test timeout)
    assert staging.superseded_by == newer and staging.waiting == []
