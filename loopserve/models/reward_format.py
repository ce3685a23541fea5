"""What a reward model reads and what its scores mean, shared by the reward service (serving) and the
trainer (training, publishing): the (prompt, response) pair encoding, a version's reward statistics
(normalised scores), and the builtin reference pairs. One definition, so training and serving never
see different inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], max_length: int
) -> dict[str, list[list[int]]]:
    """Token ids (with special tokens) and token type ids of each pair, at most `max_length` tokens.

    The reward judges the response, so a pair over the window loses prompt tokens first
    ('only_first'). Only when the response alone leaves no room for a single prompt token does it
    fall back to 'longest_first' (trim the longer side until the pair fits).
    """
    prompts = [p for p, _ in pairs]
    responses = [r for _, r in pairs]
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    response_len = tokenizer(responses, add_special_tokens=False, return_length=True)["length"]
    only_first = [i for i, n in enumerate(response_len) if n + specials < max_length]
    longest_first = [i for i, n in enumerate(response_len) if n + specials >= max_length]
    input_ids: list[list[int]] = [[] for _ in pairs]
    token_type_ids: list[list[int]] = [[] for _ in pairs]
    for idx, strategy in ((only_first, "only_first"), (longest_first, "longest_first")):
        if not idx:
            continue
        enc = tokenizer(
            [prompts[i] for i in idx],
            [responses[i] for i in idx],
            truncation=strategy,
            max_length=max_length,
            return_token_type_ids=True,
        )
        for j, i in enumerate(idx):
            input_ids[i] = enc["input_ids"][j]
            token_type_ids[i] = enc["token_type_ids"][j]
    return {"input_ids": input_ids, "token_type_ids": token_type_ids}


# The reference set of a version published without statistics (the provisioned base, or one published
# by hand): generic prompts with answers from helpful to unhelpful, so the spread of r is the model's
# own. Versions the trainer publishes carry statistics on held-out served responses instead.
BUILTIN_REFERENCE_PAIRS = tuple(
    (prompt, response)
    for prompt in (
        "Write a short product review of green tea.",
        "Explain what a reward model is in one sentence.",
        "Share a brief review of dark chocolate for other shoppers.",
        "Give one tip for brewing coffee at home.",
    )
    for response in (
        "Wonderful! Fresh, fragrant and exactly as described; I would buy it again.",
        "It was fine. Nothing special, but it did the job.",
        "Terrible. It arrived stale and the package was broken.",
        "I don't know.",
        "A clear, careful answer that addresses the question directly and politely.",
        "asdf qwerty lorem ipsum",
    )
)


DEFAULT_CLIP = 5.0
"""Range [-5, 5] of normalised rewards when a request names none: 5 standard deviations of the
reference set, so only outliers (often reward hacks) are clipped."""
MAX_CLIP = 1e4
STATS_KEY = "reward_stats"
"""Where a reward version's manifest keeps its statistics: meta["reward_stats"] = {mean, std, n, source}."""


@dataclass(frozen=True)
class RewardStats:
    """Mean and std of one reward version's raw rewards on a reference set of (prompt, response) pairs."""

    mean: float
    std: float
    n: int
    source: str
    """"publish" (held-out responses, computed by the trainer when it published the version) or
    "builtin" (a version published without statistics: the service's fixed reference pairs, at load)."""

    @classmethod
    def of(cls, rewards: list[float], source: str) -> RewardStats:
        n = len(rewards)
        mean = sum(rewards) / max(n, 1)
        var = sum((r - mean) ** 2 for r in rewards) / max(n - 1, 1)
        return cls(mean, math.sqrt(var), n, source)

    @classmethod
    def from_meta(cls, meta: dict[str, object]) -> RewardStats | None:
        """The statistics stored in a manifest's meta, or None when absent or unusable."""
        d = meta.get(STATS_KEY)
        if not isinstance(d, dict):
            return None
        try:
            stats = cls(float(d["mean"]), float(d["std"]), int(d["n"]), str(d.get("source", "publish")))
        except (KeyError, TypeError, ValueError):
            return None
        return stats if math.isfinite(stats.mean) and math.isfinite(stats.std) and stats.std >= 0 else None

    def to_meta(self) -> dict[str, object]:
        return {"mean": self.mean, "std": self.std, "n": self.n, "source": self.source}

    def normalise(self, rewards: list[float] | tuple[float, ...], clip: float) -> tuple[float, ...]:
        """(r - mean) / std, clipped to [-clip, clip]: monotone in r, so the order is kept (up to ties
        at the clip). A std of ~0 (a reference set the model cannot tell apart) counts as 1."""
        std = self.std if self.std > 1e-6 else 1.0
        return tuple(min(clip, max(-clip, (r - self.mean) / std)) for r in rewards)
