"""`loopserve ml-backend` (the adapter on its own) and `loopserve labelstudio connect` (a Label Studio
project with loopserve behind it). Registered by loopserve/cli/command.py; imports nothing heavy until run."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from loopserve.config import DEFAULT_POLICY_PORT, DataDirConfig
from loopserve.labelstudio.config import DEFAULT_ML_BACKEND_PORT, MLBackendConfig

LABEL_STUDIO_TOKEN_ENV = "LOOPSERVE_LABEL_STUDIO_TOKEN"


@dataclass(kw_only=True)
class ConnectConfig(DataDirConfig):
    """Create a Label Studio project of reviews with loopserve as its ML backend."""

    label_studio_url: str = "http://localhost:8080"
    """Label Studio's URL"""
    label_studio_token: str = ""
    """its API token (prefer the environment variable LOOPSERVE_LABEL_STUDIO_TOKEN)"""
    backend_url: str = f"http://localhost:{DEFAULT_ML_BACKEND_PORT}"
    """the adapter (`loopserve ml-backend`), as Label Studio reaches it"""
    policy_target: str = f"127.0.0.1:{DEFAULT_POLICY_PORT}"
    """the policy service (for its labels)"""
    token_file: Path | None = None
    """loopserve tokens (default <data-dir>/tokens.json)"""
    auth: bool = True
    """the services require tokens (--no-auth: they run without, development only)"""
    dataset: Path | None = None
    """JSONL / CSV with text, label (default: Fine Food)"""
    tasks: int = 100
    """how many reviews to import"""
    title: str = "loopserve: Fine Food reviews"
    """the project's title"""


def cmd_ml_backend(cfg: MLBackendConfig) -> int:
    from loopserve.labelstudio.http_app import run

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(cfg)
    return 0


def cmd_connect(cfg: ConnectConfig) -> int:
    from loopserve.auth import read_token
    from loopserve.client import Client
    from loopserve.datasets import load_dataset, pull_finefoods
    from loopserve.labelstudio.labelstudio_api import LabelStudioAPI
    from loopserve.labelstudio.project import connect

    ls_token = cfg.label_studio_token or os.environ.get(LABEL_STUDIO_TOKEN_ENV, "")
    if not ls_token:
        raise ValueError(f"a Label Studio API token is needed: --label-studio-token or {LABEL_STUDIO_TOKEN_ENV}")
    token = None if not cfg.auth else read_token(cfg.token_file or cfg.data_dir / "tokens.json", "annotator")
    with Client(cfg.policy_target, token) as c:
        labels = [label.name for label in c.model_info().labels]
    path = cfg.dataset or pull_finefoods(cfg.data_dir / "data")
    train, _test = load_dataset(path)
    texts = [e.text for e in train[: cfg.tasks]]
    api = LabelStudioAPI(cfg.label_studio_url, ls_token)
    try:
        p = connect(api, backend_url=cfg.backend_url, token=token, labels=labels, texts=texts, title=cfg.title)
    finally:
        api.close()
    print(f"project {p.project}: {p.tasks} tasks, ML backend {p.ml_backend} at {cfg.backend_url}")
    print(f"annotate at {p.url}")
    return 0
