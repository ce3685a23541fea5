"""Typed process configs, and the one reader of them. Each process builds exactly one, in main().

Every field can be set by a flag (``--field-name``) or an environment variable
(``LOOPSERVE_FIELD_NAME``); a flag wins over the environment, which wins over the default. The
docstring under each field is its --help. `parse` reads them all through one library parser (tyro):
the environment, and the `args` of a Ray Serve application (`flags_of`), become flags in front of the
command line's. Importing this module reads nothing (tyro loads when a config is parsed).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

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
class DataDirConfig:
    """Where the data lives."""

    data_dir: Path = Path(DEFAULT_DATA_DIR)
    """where the store, log and tokens live"""


@dataclass
class StoreConfig(DataDirConfig):
    """A command that reads or writes the model store."""

    store_dir: Path | None = None
    """model store (default: <data-dir>/store)"""

    @property
    def store_path(self) -> Path:
        return self.store_dir or self.data_dir / "store"


@dataclass
class LogConfig(DataDirConfig):
    """A command that reads or writes the feedback log."""

    log_url: str = ""
    """feedback log: a SQLite path or postgresql:// URL (default: <data-dir>/feedback.sqlite3)"""

    @property
    def feedback_log_url(self) -> str:
        return self.log_url or str(self.data_dir / "feedback.sqlite3")


@dataclass
class CommonConfig(StoreConfig, LogConfig):
    """What every process that serves models shares: the store, the log, and how models run. The
    one-shot commands take only the parts they use (a flag is a promise)."""

    device: str = "auto"
    """auto | cpu | cuda (auto: CUDA when present)"""
    dtype: str = "auto"
    """auto | float32 | bfloat16 (auto: bf16 on CUDA and on a CPU with AVX512-BF16 or AMX, else fp32)"""
    log_level: str = "INFO"
    """Python logging level"""


@dataclass
class ServerConfig(CommonConfig):
    """What both gRPC services share: listening, auth, TLS, limits, batching, the store watch."""

    host: str = "127.0.0.1"
    """address to listen on (0.0.0.0 in a pod)"""
    port: int = 0
    """gRPC port (0: any free port)"""
    metrics_port: int = 0
    """Prometheus /metrics port; -1 disables"""
    metrics_host: str = ""
    """address /metrics listens on (default: --host)"""
    auth: bool = True
    """require a token on every call (--no-auth: DEVELOPMENT ONLY, accept calls without one)"""
    token_file: Path | None = None
    """JSON {token: role}; default <data-dir>/tokens.json, created if missing"""
    tls_cert: Path | None = None
    """server certificate (PEM): turns TLS on"""
    tls_key: Path | None = None
    """server private key (PEM)"""
    tls_client_ca: Path | None = None
    """CA for client certificates: turns mTLS on"""
    grace_s: float = DEFAULT_GRACE_S
    """drain grace on SIGTERM, seconds"""
    max_batch_size: int = 64
    """largest batch the batcher forms"""
    max_wait_ms: float = 5.0
    """longest a request waits for a batch to fill"""
    max_queue: int = 2048
    """queued items before RESOURCE_EXHAUSTED"""
    max_text_chars: int = 20_000
    """longer texts are INVALID_ARGUMENT"""
    max_input_tokens: int = 256
    """encoder inputs are truncated to this"""
    encoder_token_budget: int = 0
    """padded tokens per encoder forward: a batch is sorted by length and cut where padding would cost
    (0: 512 on a CPU, no token limit on a GPU; -1 or below: no token limit; 32 sequences a forward at most)"""
    watch_interval_s: float = 1.0
    """how often to poll the store's LATEST (the fallback where file events do not arrive)"""
    watch_events: bool = True
    """swap the moment LATEST changes (file-system events, inotify); off: polling only"""
    threads: int = 0
    """torch intra-op threads; 0: the cores available"""

    @property
    def token_path(self) -> Path:
        return self.token_file or self.data_dir / "tokens.json"

    @property
    def metrics_address(self) -> str:
        """/metrics binds where gRPC does unless told otherwise: a loopback service exposes nothing."""
        return self.metrics_host or self.host


@dataclass
class PolicyConfig(ServerConfig):
    """Run the policy service: Annotate and Generate, with FeedbackService and ModelAdmin."""

    port: int = DEFAULT_POLICY_PORT
    metrics_port: int = DEFAULT_POLICY_METRICS_PORT
    task: str = "sentiment"
    """name of the annotation task served"""
    review_threshold: float = 0.8
    """needs_review when the top calibrated probability is under this"""
    max_items_per_request: int = 256
    """items per Annotate call"""
    max_new_tokens_default: int = 64
    """max_new_tokens when the request says 0"""
    max_new_tokens_cap: int = 512
    """larger max_new_tokens is INVALID_ARGUMENT"""
    max_completions: int = 16
    """largest n per Generate call"""
    max_prompt_tokens: int = 1024
    """longer prompts are INVALID_ARGUMENT"""
    gen_max_batch_size: int = 16
    """sequences decoded together"""
    gen_batching: Literal["continuous", "static"] = "continuous"
    """continuous: requests join and leave the decode batch token by token; static: a batch runs until its
    longest row ends"""
    generator: bool = True
    """serve the generator (off: annotation only)"""
    explore: Literal["off", "epsilon-greedy", "softmax", "ucb"] = "off"
    """how the served label is chosen for the task: off (argmax) | epsilon-greedy | softmax | ucb; the decision
    logs the probability with which the served label was chosen"""
    explore_epsilon: float = 0.1
    """epsilon-greedy: share of items given a random label"""
    explore_temperature: float = 1.0
    """softmax exploration: temperature over the label log-probabilities"""
    explore_ucb_c: float = 0.5
    """ucb exploration: weight of the confidence bonus"""
    shadow_fraction: float = 1.0
    """shadow mode: share of Annotate calls copied to the shadow candidate"""
    shadow_promote_agreement: float = 0.0
    """shadow mode: promote the candidate automatically once its top label agrees with serving's on this share
    of items (0: only by the admin call PromoteShadow)"""
    shadow_min_items: int = 500
    """shadow mode: items the candidate must answer before automatic promotion"""
    decision_buffer: int = 100_000
    """decisions buffered before RESOURCE_EXHAUSTED"""
    log_decisions: bool = True
    """log every served answer (off: no feedback can join it; benchmarks only)"""
    ingest_process: bool = True
    """commit feedback in a child process, on a core of its own (off: on a thread of the service, sharing
    its interpreter lock with serving)"""


@dataclass
class RewardConfig(ServerConfig):
    """Run the reward service: Score and Compare, with ModelAdmin."""

    port: int = DEFAULT_REWARD_PORT
    metrics_port: int = DEFAULT_REWARD_METRICS_PORT
    max_pairs_per_request: int = 256
    """pairs per Score call"""


C = TypeVar("C")
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def flags_of(cls: type[Any], values: Mapping[str, Any], *, where: str = "") -> list[str]:
    """The flags that set `values` (field name -> value) on `cls`: a bool as `--name` / `--no-name`,
    None as nothing (the default), anything else as `--name str(value)`. Unknown names are an error
    (`where` says whose). Values are checked and converted by the parser, not here."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{where or cls.__name__}: unknown settings {unknown}; known: {sorted(known)}")
    argv: list[str] = []
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(_flag(name) if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, list | tuple):
            argv += [_flag(name), *map(str, value)]
        else:
            argv += [_flag(name), str(value)]
    return argv


def env_flags(cls: type[Any], environ: Mapping[str, str] | None = None) -> list[str]:
    """`LOOPSERVE_<FIELD>` variables of `cls`'s flat fields, as flags (empty values are unset)."""
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is None or raw == "" or dataclasses.is_dataclass(hints[f.name]):
            continue
        if hints[f.name] is bool:
            word = raw.strip().lower()
            if word not in TRUE | FALSE:
                raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw[:20]!r} is not a boolean (true / false)")
            values[f.name] = word in TRUE
        else:
            values[f.name] = raw
    return flags_of(cls, values)


def parse(
    cls: type[C],
    argv: Sequence[str] = (),
    *,
    environ: Mapping[str, str] | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> C:
    """The one reader of every process config: `cls` from the environment, then `argv` (the last
    occurrence of a flag wins, so a flag beats the environment, which beats the default). tyro builds
    the parser from the dataclass: field docstrings are the --help, bools are --x / --no-x, Literal
    fields are choices, nested dataclasses are `--section.field`. Bad values exit with a usage error."""
    import tyro

    return tyro.cli(cls, args=[*env_flags(cls, environ), *argv], prog=prog, description=description)


def to_argv(cfg: Any, cls: type[Any] | None = None, skip: set[str] | None = None) -> list[str]:
    """The flags that make `parse(cls)` (default: the type of `cfg`) read back the values `cfg` holds,
    for a process started by another (`up`): every flat field, explicitly, so that nothing depends on
    what the child's defaults or environment happen to be."""
    fields = dataclasses.fields(cls or type(cfg))
    values = {
        f.name: getattr(cfg, f.name)
        for f in fields
        if not (skip and f.name in skip) and not dataclasses.is_dataclass(getattr(cfg, f.name))
    }
    return flags_of(cls or type(cfg), values)
