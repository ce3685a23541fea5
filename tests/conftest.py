"""Shared fixtures: tiny model stores for the runtime and service tiers, the real store for slow tests.

`make test` runs the suite on two pytest-xdist workers. Each worker takes its own share of the cores
(`pytest_configure`), so its tests and every process they start (services, trainers, Ray, Label Studio)
size their thread pools to that share: two processes that each run torch on every core spin at each
other's barriers (a PPO test that takes 5 s alone took 113 s so). The heavy tests (the two quick demos)
come first in the collection, every other one (`pytest_collection_modifyitems`): xdist's load scheduler
with `--maxschedchunk 1` starts each worker on two consecutive tests, so each worker starts on a demo and
the rest is shared out one test at a time behind them. Both demos on one worker, the suite took 1,254 s;
one a worker, 978 and 1,061 s. The tests marked `ray` take turns (`one_ray_cluster`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from filelock import FileLock

from loopserve.models.store import ModelStore
from tests.support import tiny_models


@pytest.fixture(scope="session")
def tiny_store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with v0 of a tiny annotator, generator and reward model (built once, copied per test)."""
    root = tmp_path_factory.mktemp("tiny-store")
    build = tmp_path_factory.mktemp("tiny-build")
    store = ModelStore(root / "store")
    store.publish_version("annotator", tiny_models.tiny_annotator(build / "annotator"))
    store.publish_version("generator", tiny_models.tiny_generator(build / "generator"))
    store.publish_version("reward", tiny_models.tiny_reward(build / "reward"))
    return root


@pytest.fixture
def tiny_data_dir(tiny_store_template: Path, tmp_path: Path) -> Path:
    """A fresh data dir holding a copy of the tiny store."""
    shutil.copytree(tiny_store_template / "store", tmp_path / "store")
    return tmp_path


@pytest.fixture(scope="session")
def real_store() -> ModelStore:
    """The real bundled models (base versions), pulled once into ./.loopserve like `make test` does."""
    from loopserve.models import provision

    store = ModelStore(tiny_models.REAL_STORE)
    provision.pull(store)
    return store


def pytest_configure(config: pytest.Config) -> None:
    """On an xdist worker: this worker's share of the cores, every worker a different one (inherited by the
    processes its tests start, and read by loopserve.device.configure_threads as theirs)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count:
        return
    cores = sorted(os.sched_getaffinity(0))
    index, count_n = int(worker.removeprefix("gw")), int(count)
    if len(cores) < count_n:
        return  # fewer cores than workers: no share to give each
    mine = cores[index::count_n]
    os.sched_setaffinity(0, mine)
    import torch

    torch.set_num_threads(len(mine))  # in case torch sized its pool before the affinity changed


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests marked heavy first, each followed by one other test; the rest in collection order."""
    heavy = [item for item in items if item.get_closest_marker("heavy") is not None]
    rest = [item for item in items if item.get_closest_marker("heavy") is None]
    pairs = min(len(heavy), len(rest))
    front = [t for h, other in zip(heavy, rest, strict=False) for t in (h, other)]
    items[:] = front + heavy[pairs:] + rest[pairs:]


@pytest.fixture(autouse=True)
def one_ray_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A test marked `ray` runs while no other does, whichever worker runs it: one local Ray cluster on the
    machine at a time (a lock in the folder above each worker's temporary root, which the workers of one
    run share)."""
    if request.node.get_closest_marker("ray") is None:
        yield
        return
    with FileLock(tmp_path_factory.getbasetemp().parent / "one-ray-cluster.lock"):
        yield
