"""Shared fixtures: tiny model stores for the runtime and service tiers, the real store for slow tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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
