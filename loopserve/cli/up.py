"""`loopserve up`: the embedded stack on one machine, as separate processes (each with its own GIL and
torch threads): the policy service, the reward service and the trainer, over one data dir (SQLite log,
local store, one token file). SIGINT/SIGTERM stops all of them with their drain grace.

Each service process gets its whole config as explicit flags (`config.to_argv`), built by the same
reader it would use alone, so every flag `up` shows (TLS, limits, auth, ports, metrics host) reaches
the process it is for.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from loopserve.auth import ensure_token_file
from loopserve.config import (
    DEFAULT_POLICY_METRICS_PORT,
    DEFAULT_POLICY_PORT,
    DEFAULT_REWARD_METRICS_PORT,
    DEFAULT_REWARD_PORT,
    PolicyConfig,
    RewardConfig,
    to_argv,
)

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class UpConfig(PolicyConfig):
    """Run everything on this machine: the policy service, the reward service and the trainer. Every
    shared flag (auth, TLS, limits, data dir, ...) reaches both services; the policy-only ones the
    policy service; the reward's own below."""

    port: Annotated[int, tyro.conf.arg(aliases=("--policy-port",))] = DEFAULT_POLICY_PORT
    """the policy service's gRPC port"""
    reward_port: int = DEFAULT_REWARD_PORT
    """the reward service's gRPC port"""
    reward_metrics_port: int | None = None
    """the reward service's /metrics port (default 9102 beside the policy's default, the next port beside
    another, off or ephemeral with the policy's; -1 disables)"""
    max_pairs_per_request: int = RewardConfig.max_pairs_per_request
    """reward service: pairs per Score call"""
    trainer: bool = True
    """run the trainer (--no-trainer: services only)"""
    ml_backend_port: int | None = None
    """also serve Label Studio's ML backend on this port (usually 9090)"""
    label_studio_url: str = ""
    """Label Studio's URL, for the ML backend's refreshes"""
    tls_ca: Path | None = None
    """CA the trainer trusts for --tls-cert (default: that certificate)"""


def policy_config(up: PolicyConfig) -> PolicyConfig:
    """The policy service's config: its own fields of `up`."""
    return PolicyConfig(**{f.name: getattr(up, f.name) for f in dataclasses.fields(PolicyConfig)})


def reward_config(
    policy: PolicyConfig,
    *,
    port: int = DEFAULT_REWARD_PORT,
    metrics_port: int | None = None,
    max_pairs_per_request: int = RewardConfig.max_pairs_per_request,
) -> RewardConfig:
    """The reward service's config: what the two services share comes from `policy` (the flags `up`
    read), its own fields and ports from the rest (its metrics port by default the reward service's
    default beside the policy's default, the next port beside another, off or ephemeral with the
    policy's)."""
    shared = {f.name: getattr(policy, f.name) for f in dataclasses.fields(RewardConfig) if hasattr(policy, f.name)}
    cfg = RewardConfig(**shared)
    cfg.max_pairs_per_request = max_pairs_per_request
    cfg.port = port
    if metrics_port is not None:
        cfg.metrics_port = metrics_port
    elif policy.metrics_port == DEFAULT_POLICY_METRICS_PORT:
        cfg.metrics_port = DEFAULT_REWARD_METRICS_PORT
    else:
        cfg.metrics_port = policy.metrics_port if policy.metrics_port <= 0 else policy.metrics_port + 1
    return cfg


def stack_configs(up: UpConfig) -> tuple[PolicyConfig, RewardConfig]:
    return policy_config(up), reward_config(
        up, port=up.reward_port, metrics_port=up.reward_metrics_port, max_pairs_per_request=up.max_pairs_per_request
    )


def _trainer_argv(policy: PolicyConfig, reward: RewardConfig, tls_ca: Path | None) -> list[str]:
    # The trainer calls the reward service on loopback (it binds 127.0.0.1 or every interface).
    argv = [
        "train",
        "--data-dir",
        str(policy.data_dir),
        "--device",
        policy.device,
        # The gate, the calibration and the online tier judge the annotator in the precision it is served in.
        "--annotator.eval-dtype",
        policy.dtype,
        "--log-level",
        policy.log_level,
        "--reward-target",
        f"127.0.0.1:{reward.port}",
    ]
    if policy.store_dir:
        argv += ["--store-dir", str(policy.store_dir)]
    if policy.log_url:
        argv += ["--log-url", policy.log_url]
    if policy.token_file:
        argv += ["--token-file", str(policy.token_file)]
    if reward.tls_cert is not None:
        argv += ["--reward-tls-ca", str(tls_ca or reward.tls_cert)]
    return argv


def run_embedded(
    cfg: PolicyConfig,
    reward: RewardConfig | None = None,
    *,
    train: bool = True,
    tls_ca: Path | None = None,
    ml_backend_port: int | None = None,
    label_studio_url: str = "",
) -> int:
    """Run the stack until SIGINT / SIGTERM. `reward` defaults to what `cfg` implies (`reward_config`);
    `tls_ca` is the CA the trainer trusts for the reward service's certificate (default: the
    certificate itself, for a self-signed one)."""
    reward = reward or reward_config(cfg)
    if train and cfg.tls_client_ca is not None:
        raise ValueError("the trainer presents no client certificate: with --tls-client-ca (mTLS) use --no-trainer")
    if cfg.auth and cfg.token_file is None:
        ensure_token_file(cfg.token_path)
        print(f"tokens (client, annotator, admin roles): {cfg.token_path.resolve()}")
    exe = [sys.executable, "-m", "loopserve"]
    policy = dataclasses.replace(cfg)
    # Two services and a trainer share the cores: give each a fair share of torch threads.
    share = max(1, (os.cpu_count() or 2) // 2)
    policy.threads = policy.threads or share
    reward.threads = reward.threads or share
    procs = {
        "policy": [*exe, "policy", *to_argv(policy)],
        "reward": [*exe, "reward", *to_argv(reward)],
    }
    if train:
        procs["trainer"] = [*exe, *_trainer_argv(policy, reward, tls_ca)]
    if ml_backend_port is not None:
        from loopserve.labelstudio.config import MLBackendConfig

        adapter = MLBackendConfig(
            data_dir=policy.data_dir,
            log_level=policy.log_level,
            host=policy.host,
            port=ml_backend_port,
            policy_target=f"127.0.0.1:{policy.port}",
            auth=policy.auth,
            token_file=policy.token_file,
            label_studio_url=label_studio_url,
            policy_root_cert=(tls_ca or policy.tls_cert) if policy.tls_cert else None,
        )
        procs["ml-backend"] = [*exe, "ml-backend", *to_argv(adapter)]
    running = {name: subprocess.Popen(argv) for name, argv in procs.items()}
    scheme = "TLS" if cfg.tls_cert else "plaintext"
    metrics = f"metrics {policy.metrics_address}:{policy.metrics_port}" if policy.metrics_port >= 0 else "no metrics"
    print(
        f"policy on {policy.host}:{policy.port} ({scheme}, {metrics}), reward on {reward.host}:{reward.port}"
        + (
            f", Label Studio ML backend on http://{policy.host}:{ml_backend_port}"
            if ml_backend_port is not None
            else ""
        )
        + "; Ctrl-C stops everything",
        flush=True,
    )
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    while not stopping:
        for name, p in running.items():
            if p.poll() is not None:
                logger.error("%s exited with code %s; stopping the stack", name, p.returncode)
                code = p.returncode or 1
                stopping = True
        time.sleep(0.5)
    for p in running.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + cfg.grace_s + 5
    for p in running.values():
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
    return code
