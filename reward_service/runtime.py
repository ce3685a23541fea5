"""RewardRuntime: the reward model as plain Python over torch (no grpc).

r(prompt, response) is the scalar head of a sentence encoder over the pair cross-encoded as one
sequence (`[CLS] prompt [SEP] response [SEP]`, loopserve/models/encoder_heads.py); Compare is
Bradley-Terry, P(a preferred over b) = sigmoid(r_a - r_b) (Bradley & Terry, 1952; the preference
model of Ouyang et al., 2022).

Life cycle (KServe's model base): `load()` fills the model slot from the store, `healthy()` says
whether it is loaded, `score_batch` runs one batch on a given loaded version (the caller pins the
version per request so that a swap never mixes versions in one response).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import astuple, dataclass, field
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from loopserve import metrics
from loopserve.config import RewardConfig
from loopserve.device import pick_device, pick_dtype
from loopserve.errors import ModelFault, VerificationError
from loopserve.models import encoder_heads, verify
from loopserve.models.encoder_heads import RewardModel
from loopserve.models.micro_batches import MAX_ITEMS, padded_groups, token_budget
from loopserve.models.reward_format import BUILTIN_REFERENCE_PAIRS, RewardStats, encode_pairs
from loopserve.models.slot import Loaded, ModelSlot
from loopserve.models.store import ModelStore, VersionReader
from loopserve.models.tokenizers import unshared
from reward_service.types import CompareCall, CompareResult

logger = logging.getLogger(__name__)


class HasPairs(Protocol):
    """Anything the batcher queues for scoring: a ScoreCall, or a CompareCall (two pairs)."""

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]: ...


@dataclass(frozen=True)
class RewardBundle:
    model: RewardModel
    tokenizer: PreTrainedTokenizerBase
    stats: RewardStats = field(default_factory=lambda: RewardStats(0.0, 1.0, 0, "none"))
    """The version's reference statistics, for normalised Score (from its manifest, or builtin)."""


@dataclass
class RuntimeOptions:
    device: torch.device
    dtype: torch.dtype
    max_input_tokens: int = 256
    token_budget: int = 0
    """Padded tokens per encoder forward, as `--encoder-token-budget`: 0 takes the device's rule (512 on a CPU,
    no token limit on a GPU: loopserve.models.micro_batches.token_budget), resolved here, where the device is
    known, so every caller of the runtime cuts alike."""
    micro_batch: int = MAX_ITEMS
    """Pairs per encoder forward, at most."""

    def __post_init__(self) -> None:
        self.token_budget = token_budget(self.token_budget, self.device.type)

    @classmethod
    def of(cls, cfg: RewardConfig) -> RuntimeOptions:
        """The options a reward process serves with (the grpc.aio app and each Ray replica alike)."""
        device = pick_device(cfg.device)
        return cls(
            device=device,
            dtype=pick_dtype(cfg.dtype, device),
            max_input_tokens=cfg.max_input_tokens,
            token_budget=cfg.encoder_token_budget,
        )


class RewardRuntime:
    def __init__(self, store: ModelStore, options: RuntimeOptions) -> None:
        self.store = store
        self.opts = options
        self.reward: ModelSlot[RewardBundle] = ModelSlot("reward", store, self._load_reward, self._check_reward)

    # ---- life cycle ----------------------------------------------------------------------------

    def load(self) -> None:
        self.reward.load_latest()

    def healthy(self) -> bool:
        return self.reward.ready

    def slots(self) -> dict[str, ModelSlot]:  # type: ignore[type-arg]
        return {"reward": self.reward}

    # ---- loader and check (run by ModelSlot during a swap) -------------------------------------

    def _load_reward(self, reader: VersionReader, serving: Loaded[RewardBundle] | None) -> RewardBundle:
        folder, manifest = reader.folder, reader.manifest
        old = (serving.model.model, serving.manifest) if serving is not None else None
        model = encoder_heads.load(folder, self.opts.device, self.opts.dtype, reader=reader, serving=old)
        if not isinstance(model, RewardModel):
            kind = encoder_heads.HeadSpec.read(folder).kind
            raise VerificationError(f"{folder.name} is not a reward model (head kind {kind!r})")
        if serving is not None and reader.unchanged_besides_weights(serving.manifest, ignore=[encoder_heads.HEAD_FILE]):
            tokenizer = unshared(serving.model.tokenizer)  # the same files: copied, not read again
        else:
            tokenizer = encoder_heads.load_tokenizer(folder)
        bundle = RewardBundle(model, tokenizer)
        stats = RewardStats.from_meta(manifest.meta)
        if stats is None:  # published without statistics: the builtin reference set, computed now
            stats = RewardStats.of(self.rewards(bundle, BUILTIN_REFERENCE_PAIRS), "builtin")
        logger.info("reward %s: reference mean %.4f std %.4f (n %d, %s)", manifest.version, *astuple(stats))
        return RewardBundle(bundle.model, bundle.tokenizer, stats)

    def _check_reward(self, new: Loaded[RewardBundle], old: Loaded[RewardBundle] | None) -> None:
        verify.check_encoder(new.model.model, new.model.tokenizer, None, new.manifest.meta)

    # ---- score ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def rewards(self, bundle: RewardBundle, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """r for each pair, in order: pairs sorted by length, run in micro-batches."""
        tok = bundle.tokenizer
        enc = encode_pairs(tok, pairs, self.opts.max_input_tokens)
        out = [0.0] * len(pairs)
        fields = {k: enc[k] for k in ("input_ids", "token_type_ids")}
        for idx, batch in padded_groups(tok, fields, self.opts.token_budget, self.opts.micro_batch):
            r = bundle.model(
                batch["input_ids"].to(self.opts.device),
                batch["attention_mask"].to(self.opts.device),
                token_type_ids=batch["token_type_ids"].to(self.opts.device),
            )  # (b,), fp32 head
            for i, value in zip(idx, r.float().cpu().tolist(), strict=True):
                out[i] = value
        return out

    def score_batch(self, handle: Loaded[RewardBundle], calls: Sequence[HasPairs]) -> list[list[float] | Exception]:
        """One pass over every pair of every call; per call, its rewards in pair order, or the error
        of that call alone (a non-finite reward is the model's fault: ModelFault, INTERNAL)."""
        flat = [pair for call in calls for pair in call.pairs]
        rewards = self.rewards(handle.model, flat)
        results: list[list[float] | Exception] = []
        k = 0
        for call in calls:
            n = len(call.pairs)
            own = rewards[k : k + n]
            if all(math.isfinite(r) for r in own):
                results.append(own)
            else:
                metrics.MODEL_FAULTS.labels("reward").inc()
                logger.error("reward %s gave non-finite rewards on %d pairs", handle.version, n)
                results.append(
                    ModelFault("the reward model produced a non-finite reward; the server logged the incident")
                )
            k += n
        return results

    def compare_batch(self, handle: Loaded[RewardBundle], calls: Sequence[CompareCall]) -> list[CompareResult]:
        """P(a preferred) = sigmoid(r_a - r_b) for each call (for callers without a batcher)."""
        out = []
        for scores in self.score_batch(handle, calls):
            if isinstance(scores, Exception):
                raise scores
            out.append(CompareResult.from_scores(handle.version, scores[0], scores[1]))
        return out


__all__ = ["RewardBundle", "RewardRuntime", "RuntimeOptions"]
