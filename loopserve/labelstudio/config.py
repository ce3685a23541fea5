"""`MLBackendConfig`: the one config of the Label Studio adapter process (`loopserve ml-backend`, or
the adapter `loopserve up --ml-backend-port` starts)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loopserve.config import DEFAULT_DATA_DIR, DEFAULT_POLICY_PORT

DEFAULT_ML_BACKEND_PORT = 9090  # Label Studio's usual ML backend port


@dataclass
class MLBackendConfig:
    """Serve Label Studio's ML backend protocol (HTTP) over the policy service."""

    # Its own fields only (not CommonConfig's): the adapter loads no model and opens no log, so it
    # shows no --device or --log-url that would do nothing.
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    """the data dir shared with the services (tokens, trainer)"""
    log_level: str = "INFO"
    """Python logging level"""
    host: str = "127.0.0.1"
    """address the HTTP adapter listens on"""
    port: int = DEFAULT_ML_BACKEND_PORT
    """HTTP port Label Studio connects to"""
    policy_target: str = f"127.0.0.1:{DEFAULT_POLICY_PORT}"
    """the policy service (host:port)"""
    policy_root_cert: Path | None = None
    """CA certificate (PEM) to trust when the policy service uses TLS"""
    auth: bool = True
    """require a token on every call (--no-auth: DEVELOPMENT ONLY, accept calls without one)"""
    token_file: Path | None = None
    """JSON {token: role} shared with the services (default <data-dir>/tokens.json)"""
    label_studio_url: str = ""
    """Label Studio's URL, to refresh stale predictions (default: from /setup)"""
    label_studio_token: str = ""
    """a Label Studio API token for that (prefer the environment variable)"""
    refresh_interval_s: float = 2.0
    """how often to check the serving version for a swap; 0 disables refresh"""
    max_body_bytes: int = 16 * 1024 * 1024
    """larger request bodies get 413"""
    max_tasks_per_request: int = 10_000
    """more tasks in one /predict get 413"""
    timeout_s: float = 60.0
    """deadline of each call to the policy service"""
    trainer_dir: Path | None = None
    """where round requests go (default <data-dir>/trainer, the trainer's)"""

    @property
    def token_path(self) -> Path:
        return self.token_file or self.data_dir / "tokens.json"

    @property
    def trainer_path(self) -> Path:
        return self.trainer_dir or self.data_dir / "trainer"
