"""`loopserve ml-backend` (the adapter on its own) and `loopserve labelstudio connect` (a Label Studio
project with loopserve behind it). Registered by loopserve/cli.py; imports nothing heavy until run."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from loopserve.config import CommonConfig, add_arguments, from_namespace
from loopserve.labelstudio.config import DEFAULT_ML_BACKEND_PORT, MLBackendConfig

LABEL_STUDIO_TOKEN_ENV = "LOOPSERVE_LABEL_STUDIO_TOKEN"


def cmd_ml_backend(ns: argparse.Namespace) -> int:
    from loopserve.labelstudio.http_app import run

    cfg = from_namespace(MLBackendConfig, ns)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(cfg)
    return 0


def cmd_connect(ns: argparse.Namespace) -> int:
    from loopserve.auth import read_token
    from loopserve.client import Client
    from loopserve.datasets import load_dataset, pull_finefoods
    from loopserve.labelstudio.labelstudio_api import LabelStudioAPI
    from loopserve.labelstudio.project import connect

    cfg = from_namespace(CommonConfig, ns)
    ls_token = ns.label_studio_token or os.environ.get(LABEL_STUDIO_TOKEN_ENV, "")
    if not ls_token:
        raise ValueError(f"a Label Studio API token is needed: --label-studio-token or {LABEL_STUDIO_TOKEN_ENV}")
    token = None if not ns.auth else read_token(ns.token_file or cfg.data_dir / "tokens.json", "annotator")
    with Client(ns.policy_target, token) as c:
        labels = [label.name for label in c.model_info().labels]
    path = ns.dataset or pull_finefoods(cfg.data_dir / "data")
    train, _test = load_dataset(path)
    texts = [e.text for e in train[: ns.tasks]]
    api = LabelStudioAPI(ns.label_studio_url, ls_token)
    try:
        p = connect(api, backend_url=ns.backend_url, token=token, labels=labels, texts=texts, title=ns.title)
    finally:
        api.close()
    print(f"project {p.project}: {p.tasks} tasks, ML backend {p.ml_backend} at {ns.backend_url}")
    print(f"annotate at {p.url}")
    return 0


def add_parsers(sub: Any) -> None:
    mlb = sub.add_parser("ml-backend", help="serve Label Studio's ML backend protocol (HTTP) over the policy service")
    add_arguments(mlb, MLBackendConfig)
    mlb.set_defaults(fn=cmd_ml_backend)

    ls = sub.add_parser("labelstudio", help="Label Studio projects").add_subparsers(dest="ls_command", required=True)
    con = ls.add_parser("connect", help="create a project of reviews with loopserve as its ML backend")
    add_arguments(con, CommonConfig)
    con.add_argument("--label-studio-url", default="http://localhost:8080", help="Label Studio's URL")
    con.add_argument("--label-studio-token", default="", help=f"its API token (env {LABEL_STUDIO_TOKEN_ENV})")
    con.add_argument("--backend-url", default=f"http://localhost:{DEFAULT_ML_BACKEND_PORT}", help="the adapter")
    con.add_argument("--policy-target", default="127.0.0.1:50051", help="the policy service (for its labels)")
    con.add_argument("--token-file", type=Path, default=None, help="loopserve tokens (default <data-dir>/tokens.json)")
    con.add_argument(
        "--auth",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the services require tokens (--no-auth: they run without, development only)",
    )
    con.add_argument("--dataset", type=Path, default=None, help="JSONL / CSV with text, label (default: Fine Food)")
    con.add_argument("--tasks", type=int, default=100, help="how many reviews to import")
    con.add_argument("--title", default="loopserve: Fine Food reviews")
    con.set_defaults(fn=cmd_connect)


def ml_backend_flags(port: int, policy_port: int, label_studio_url: str) -> list[str]:
    """The adapter's flags as `loopserve up` starts it beside the policy service."""
    flags = ["--port", str(port), "--policy-target", f"127.0.0.1:{policy_port}"]
    if label_studio_url:
        flags += ["--label-studio-url", label_studio_url]
    return flags
