"""Typed process configs. Each process builds exactly one, in main(), from flags and environment.

Every field can be set by a flag (``--field-name``) or an environment variable
(``LOOPSERVE_FIELD_NAME``); a flag wins over the environment, which wins over the default.
Importing this module reads nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

DEFAULT_POLICY_PORT = 50051
DEFAULT_REWARD_PORT = 50052
DEFAULT_POLICY_METRICS_PORT = 9101
DEFAULT_REWARD_METRICS_PORT = 9102
DEFAULT_TRAINER_METRICS_PORT = 9103
DEFAULT_DATA_DIR = "./.loopserve"
DEFAULT_GRACE_S = 30.0
ENV_PREFIX = "LOOPSERVE_"

# Full service names, as clients, probes and checks use them.
POLICY_SERVICE = "loopserve.policy.v1.PolicyService"
REWARD_SERVICE = "loopserve.reward.v1.RewardService"
FEEDBACK_SERVICE = "loopserve.feedback.v1.FeedbackService"
ADMIN_SERVICE = "loopserve.admin.v1.ModelAdmin"


@dataclass
class CommonConfig:
    data_dir: Path = field(default=Path(DEFAULT_DATA_DIR), metadata={"help": "where the store, log and tokens live"})
    store_dir: Path | None = field(default=None, metadata={"help": "model store (default: <data-dir>/store)"})
    log_url: str = field(
        default="",
        metadata={"help": "feedback log: a SQLite path or postgresql:// URL (default: <data-dir>/feedback.sqlite3)"},
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda (auto: CUDA when present)"})
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 (auto: bf16 on CUDA, fp32 on CPU)"})
    log_level: str = field(default="INFO", metadata={"help": "Python logging level"})

    @property
    def store_path(self) -> Path:
        return self.store_dir or self.data_dir / "store"

    @property
    def feedback_log_url(self) -> str:
        return self.log_url or str(self.data_dir / "feedback.sqlite3")


@dataclass
class ServerConfig(CommonConfig):
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0 in a pod)"})
    port: int = 0
    metrics_port: int = field(default=0, metadata={"help": "Prometheus /metrics port; -1 disables"})
    metrics_host: str = field(default="", metadata={"help": "address /metrics listens on (default: --host)"})
    auth: bool = field(
        default=True,
        metadata={"help": "require a token on every call (--no-auth: DEVELOPMENT ONLY, accept calls without one)"},
    )
    token_file: Path | None = field(
        default=None, metadata={"help": "JSON {token: role}; default <data-dir>/tokens.json, created if missing"}
    )
    tls_cert: Path | None = field(default=None, metadata={"help": "server certificate (PEM): turns TLS on"})
    tls_key: Path | None = field(default=None, metadata={"help": "server private key (PEM)"})
    tls_client_ca: Path | None = field(default=None, metadata={"help": "CA for client certificates: turns mTLS on"})
    grace_s: float = field(default=DEFAULT_GRACE_S, metadata={"help": "drain grace on SIGTERM, seconds"})
    max_batch_size: int = field(default=64, metadata={"help": "largest batch the batcher forms"})
    max_wait_ms: float = field(default=5.0, metadata={"help": "longest a request waits for a batch to fill"})
    max_queue: int = field(default=2048, metadata={"help": "queued items before RESOURCE_EXHAUSTED"})
    max_text_chars: int = field(default=20_000, metadata={"help": "longer texts are INVALID_ARGUMENT"})
    max_input_tokens: int = field(default=256, metadata={"help": "encoder inputs are truncated to this"})
    watch_interval_s: float = field(
        default=1.0,
        metadata={"help": "how often to poll the store's LATEST (the fallback where file events do not arrive)"},
    )
    watch_events: bool = field(
        default=True,
        metadata={"help": "swap the moment LATEST changes (file-system events, inotify); off: polling only"},
    )
    threads: int = field(default=0, metadata={"help": "torch intra-op threads; 0: the cores available"})

    @property
    def token_path(self) -> Path:
        return self.token_file or self.data_dir / "tokens.json"

    @property
    def metrics_address(self) -> str:
        """/metrics binds where gRPC does unless told otherwise: a loopback service exposes nothing."""
        return self.metrics_host or self.host


@dataclass
class PolicyConfig(ServerConfig):
    port: int = DEFAULT_POLICY_PORT
    metrics_port: int = DEFAULT_POLICY_METRICS_PORT
    task: str = field(default="sentiment", metadata={"help": "name of the annotation task served"})
    review_threshold: float = field(
        default=0.8, metadata={"help": "needs_review when the top calibrated probability is under this"}
    )
    max_items_per_request: int = field(default=256, metadata={"help": "items per Annotate call"})
    max_new_tokens_default: int = field(default=64, metadata={"help": "max_new_tokens when the request says 0"})
    max_new_tokens_cap: int = field(default=512, metadata={"help": "larger max_new_tokens is INVALID_ARGUMENT"})
    max_completions: int = field(default=16, metadata={"help": "largest n per Generate call"})
    max_prompt_tokens: int = field(default=1024, metadata={"help": "longer prompts are INVALID_ARGUMENT"})
    gen_max_batch_size: int = field(default=16, metadata={"help": "sequences decoded together"})
    gen_batching: str = field(
        default="continuous",
        metadata={
            "help": "continuous: requests join and leave the decode batch token by token; "
            "static: a batch runs until its longest row ends",
            "choices": ("continuous", "static"),
        },
    )
    generator: bool = field(default=True, metadata={"help": "serve the generator (off: annotation only)"})
    explore: str = field(
        default="off",
        metadata={
            "help": "how the served label is chosen for the task: off (argmax) | epsilon-greedy | softmax | ucb; "
            "the decision logs the probability with which the served label was chosen",
            "choices": ("off", "epsilon-greedy", "softmax", "ucb"),
        },
    )
    explore_epsilon: float = field(
        default=0.1, metadata={"help": "epsilon-greedy: share of items given a random label"}
    )
    explore_temperature: float = field(
        default=1.0, metadata={"help": "softmax exploration: temperature over the label log-probabilities"}
    )
    explore_ucb_c: float = field(default=0.5, metadata={"help": "ucb exploration: weight of the confidence bonus"})
    shadow_fraction: float = field(
        default=1.0, metadata={"help": "shadow mode: share of Annotate calls copied to the shadow candidate"}
    )
    shadow_promote_agreement: float = field(
        default=0.0,
        metadata={
            "help": "shadow mode: promote the candidate automatically once its top label agrees with serving's "
            "on this share of items (0: only by the admin call PromoteShadow)"
        },
    )
    shadow_min_items: int = field(
        default=500, metadata={"help": "shadow mode: items the candidate must answer before automatic promotion"}
    )
    decision_buffer: int = field(default=100_000, metadata={"help": "decisions buffered before RESOURCE_EXHAUSTED"})
    log_decisions: bool = field(
        default=True, metadata={"help": "log every served answer (off: no feedback can join it; benchmarks only)"}
    )


@dataclass
class RewardConfig(ServerConfig):
    port: int = DEFAULT_REWARD_PORT
    metrics_port: int = DEFAULT_REWARD_METRICS_PORT
    max_pairs_per_request: int = field(default=256, metadata={"help": "pairs per Score call"})


C = TypeVar("C")


def _base_type(tp: Any) -> Any:
    """`Path | None` -> Path; `int` -> int."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any], skip: set[str] | None = None) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if skip and f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        help_ = f.metadata.get("help", "") + f" (env {ENV_PREFIX}{f.name.upper()})"
        if tp is bool:  # --field / --no-field; fields are named for what they turn on
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(flag, dest=f.name, type=tp, default=None, choices=choices, help=help_)


def from_namespace(cls: type[C], ns: argparse.Namespace | None = None, environ: dict[str, str] | None = None) -> C:
    """Build `cls` from parsed flags, then the environment, then the defaults."""
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp = _base_type(hints[f.name])
        flag_value = getattr(ns, f.name, None) if ns is not None else None
        if flag_value is not None:
            values[f.name] = flag_value
            continue
        raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is None or raw == "":
            continue
        if tp is bool:
            values[f.name] = raw.strip().lower() in {"1", "true", "yes", "on"}
        else:
            values[f.name] = tp(raw)
        choices = f.metadata.get("choices")
        if choices and values[f.name] not in choices:
            raise ValueError(f"{ENV_PREFIX}{f.name.upper()} must be one of {', '.join(choices)}")
    return cls(**values)


def to_argv(cfg: Any, cls: type[Any] | None = None, skip: set[str] | None = None) -> list[str]:
    """The flags that make `cls` (default: the type of `cfg`) read back the values `cfg` holds, for
    a process started by another (`up`): every field, explicitly, so that nothing depends on what
    the child's defaults or environment happen to be. The inverse of `add_arguments` + `from_namespace`."""
    argv: list[str] = []
    for f in dataclasses.fields(cls or type(cfg)):
        if skip and f.name in skip:
            continue
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv
