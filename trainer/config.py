"""`TrainerArgs`: everything the trainer process reads, in one typed dataclass.

Flat fields are process settings (flags `--field-name`, env `LOOPSERVE_FIELD_NAME`); the nested ones
are each objective's own config, kept beside its math in its module, set by flags `--section.field`
or from a JSON file (`--objectives-json`). loopserve.config.parse reads it, as every process config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loopserve.config import DEFAULT_TRAINER_METRICS_PORT
from trainer.annotation_head import HeadConfig
from trainer.annotation_policy import AnnotationPolicyConfig
from trainer.causal_lm import LoraSettings
from trainer.dpo import DPOConfig
from trainer.gate import GateConfig
from trainer.generation_rl import GRPOConfig
from trainer.ppo import PPOConfig
from trainer.reward_model import RewardModelConfig
from trainer.sft import SFTConfig


@dataclass
class TrainerArgs:
    """Run the trainer: tail the feedback log, train, gate and publish the models."""

    data_dir: Path = Path("./.loopserve")
    """Where the store, the log and the trainer's checkpoints live."""
    store_dir: Path | None = None
    """Model store (default <data-dir>/store)."""
    log_url: str = ""
    """Feedback log: a SQLite path or a postgresql:// URL (default <data-dir>/feedback.sqlite3)."""
    device: str = "auto"
    """auto | cpu | cuda."""
    seed: int = 0
    """Seeds the trainer's RNGs on a fresh start (a resumed trainer restores them from its checkpoint)."""
    models: str = "annotator,reward,generator"
    """Comma-separated models to train; `annotator_head` adds the annotator's online tier (a head refit on
    cached embeddings every `head_round_labels` labels, published in seconds). Run it in a trainer of its
    own (`--models annotator_head --trainer-subdir trainer-online`) so full rounds never hold it up."""
    trainer_subdir: str = "trainer"
    """Folder under the data dir for this trainer's checkpoints and rounds.jsonl (one per trainer process)."""
    head_round_labels: int = 4
    """Online tier: a head round once this many new verified labels arrived."""
    generator_objectives: str = "dpo,grpo"
    """Comma-separated generator objectives, run in this order on one candidate per round: sft
    (demonstrations), dpo (logged pairs), grpo or ppo (online RL against the reward service)."""
    reward_target: str = "127.0.0.1:50052"
    """The reward service, for GRPO rollouts and the generator's gate."""
    token_file: Path | None = None
    """Token file for the reward service (default <data-dir>/tokens.json)."""
    reward_tls_ca: Path | None = None
    """CA certificate (PEM) to trust for a reward service that serves TLS; unset: plaintext."""
    stage_wait_s: float = 30.0
    """Publish in two phases: write the version, wait up to this long for the live services that follow
    LATEST to load and verify it beside the one they serve (a version one refuses is withdrawn), then
    move LATEST so they switch in one step; 0 moves LATEST as soon as the files are written."""
    poll_interval_s: float = 1.0
    """Sleep between log reads while the log is idle."""
    read_batch: int = 1000
    """Records per log read."""
    round_min_events: int = 64
    """A model's round starts once this many relevant events arrived since its last round ..."""
    annotator_round_growth: float = 0.0
    """Annotator: a round is also due once the new labels reach this multiple of the labels it already had
    (1.0: rounds at 12, 24, 48, ... labels, up to every `round_min_events`), so the first checked
    version serves after tens of labels rather than after the first `round_min_events`; 0 turns it off."""
    round_interval_s: float = 600.0
    """... or once this much time passed and at least one did (GRPO needs no new events)."""
    rounds_on_request: bool = False
    """Full rounds run only when asked (loopserve.annotation.round_requests: Label Studio's "Start
    training", `loopserve demo`'s app when a round is due by its count): the count, growth and interval
    triggers above are off. The online tier's head rounds keep `head_round_labels`."""
    heldout_fraction: float = 0.2
    """Share of items (by content hash) held out for evaluation and the gate, never trained on."""
    max_eval_prompts: int = 64
    """Held-out prompts used to evaluate the generator (a fixed subset, the same for every round)."""
    exclude_clients: str = ""
    """Comma-separated client ids (the x-client-id header) whose generation requests never enter the RL
    prompt pool: evaluation, canary and load-test traffic."""
    max_buffer: int = 200_000
    """Per-kind cap on stored examples (oldest dropped first); 0 means no cap."""
    checkpoint_interval_s: float = 30.0
    """While ingesting without rounds, checkpoint at most this often."""
    checkpoint_keep: int = 2
    """Complete checkpoints kept on disk."""
    checkpoint_optimizers: str = "annotator,reward"
    """Objectives whose optimizer state is checkpointed. Off for the generator by default: its AdamW
    state is ~1 GB (2 x 135M floats), and on-policy RL restarts well from a fresh optimizer."""
    reward_backoff_s: float = 5.0
    """First wait after the reward service failed; doubles on each failure ..."""
    reward_backoff_max_s: float = 300.0
    """... up to this."""
    generator_ref_version: str = ""
    """The frozen reference for KL and DPO (default: the newest generator version an SFT-only round
    published, else the oldest generator version in the store)."""
    reward_normalised: bool = True
    """Ask the reward service for normalised rewards ((r - mean) / std of the scoring version's reference
    statistics, clipped to +-reward_clip), so a reward-model swap does not change the scale RL sees."""
    reward_clip: float = 5.0
    """The declared range [-reward_clip, reward_clip] of normalised rewards."""
    once: bool = False
    """Consume the log to its end, run the rounds that are due, checkpoint, and exit."""
    max_rounds: int = 0
    """Stop after this many rounds in total; 0 means no limit."""
    metrics_port: int = DEFAULT_TRAINER_METRICS_PORT
    """Prometheus /metrics port; -1 disables."""
    log_level: str = "INFO"
    """Python logging level."""
    objectives_json: Path | None = None
    """A JSON file of overrides of the objective configs, keyed by section, e.g. {"annotator": {"epochs":
    2}, "gate": {"kl_bound": 0.3}} (the same as the flags --annotator.epochs 2 --gate.kl-bound 0.3)."""
    annotator: AnnotationPolicyConfig = field(default_factory=AnnotationPolicyConfig)
    reward: RewardModelConfig = field(default_factory=RewardModelConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA for the generator objectives (r = 0: full fine-tuning)."""
    gate: GateConfig = field(default_factory=GateConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    """The online tier's head fit (trainer.annotation_head)."""

    @property
    def store_path(self) -> Path:
        return self.store_dir or self.data_dir / "store"

    @property
    def feedback_log_url(self) -> str:
        return self.log_url or str(self.data_dir / "feedback.sqlite3")

    @property
    def trainer_dir(self) -> Path:
        return self.data_dir / self.trainer_subdir

    @property
    def token_path(self) -> Path:
        return self.token_file or self.data_dir / "tokens.json"

    def model_list(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]

    def excluded_clients(self) -> frozenset[str]:
        return frozenset(c.strip() for c in self.exclude_clients.split(",") if c.strip())

    def generator_objective_list(self) -> list[str]:
        return [m.strip() for m in self.generator_objectives.split(",") if m.strip()]

    def optimizer_objectives(self) -> set[str]:
        return {m.strip() for m in self.checkpoint_optimizers.split(",") if m.strip()}
