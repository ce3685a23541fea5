"""Reward model from human feedback: Bradley-Terry on preference pairs, plus pointwise targets.

The model (loopserve.models.encoder_heads.RewardModel) cross-encodes a (prompt, response) pair and
returns a scalar r. Three kinds of feedback train it, all read through the same sigmoid:

- preference pairs, Bradley-Terry (Bradley & Terry, 1952; Christiano et al., 2017; Ouyang et al., 2022):
      P(chosen > rejected) = sigmoid(r_c - r_r),      loss = -log sigmoid(r_c - r_r)
- ratings on a declared scale [lo, hi], regression of the squashed reward on the normalised value:
      loss = (sigmoid(r) - (value - lo) / (hi - lo))^2
- accept / reject of a served generation, a logistic target y in {1, 0}:
      loss = BCE(sigmoid(r), y)

so sigmoid(r) reads as "how likely a person approves" for all three, and the pairwise loss only fixes
differences, the pointwise ones anchor the level. The reward service's Compare is sigmoid(r_a - r_b).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from loopserve.models.encoder_heads import RewardModel
from loopserve.models.reward_format import BUILTIN_REFERENCE_PAIRS, RewardStats, encode_pairs
from trainer.examples import PointwiseExample, PreferencePair, RatingExample
from trainer.gate import LossGuard
from trainer.optim import encoder_optimizer


@dataclass
class RewardModelConfig:
    encoder_lr: float = 3e-5
    """AdamW learning rate of the MiniLM encoder (full fine-tuning, as for the annotator)."""
    head_lr: float = 1e-3
    """Learning rate of the 1-output head."""
    weight_decay: float = 0.01
    """AdamW weight decay (not on biases and LayerNorm)."""
    batch_size: int = 16
    """Examples per step (a pair counts once but costs two sequences)."""
    max_length: int = 256
    """Tokens of the (prompt, response) pair; longer pairs are truncated longest-first."""
    epochs: float = 1.0
    """Passes over the training examples per round."""
    max_steps: int = 0
    """Cap on optimizer steps per round; 0 means no cap."""
    rating_coef: float = 1.0
    """Weight of the rating regression loss."""
    pointwise_coef: float = 1.0
    """Weight of the accept / reject logistic loss."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    eval_batch_size: int = 64
    """Sequences per forward pass in evaluation."""
    stats_reference_size: int = 256
    """Held-out (prompt, response) pairs, oldest first, on which a published version's reward mean and
    std are computed (its normalisation statistics, stored in its manifest)."""


def rewards(
    model: RewardModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int,
) -> torch.Tensor:
    """r for each (prompt, response), cross-encoded as one sequence: (B,).

    Encoded by the reward service's own `encode_pairs` (prompt truncated first), so the model is
    trained on exactly the inputs it will score in production."""
    device = next(model.parameters()).device
    enc = encode_pairs(tokenizer, list(zip(prompts, responses, strict=True)), max_length)
    batch = tokenizer.pad(enc, return_tensors="pt").to(device)
    return model(batch["input_ids"], batch["attention_mask"], token_type_ids=batch["token_type_ids"])  # (B,)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """(P,), (P,) -> (P,): -log P(chosen preferred)."""
    return -F.logsigmoid(r_chosen - r_rejected)


def rating_loss(r: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(R,), (R,) in [0, 1] -> (R,): squared error of the squashed reward."""
    return (torch.sigmoid(r) - target) ** 2


def pointwise_loss(r: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(A,), (A,) in {0, 1} -> (A,): logistic loss, accept = 1."""
    return F.binary_cross_entropy_with_logits(r, target, reduction="none")


def make_optimizer(model: RewardModel, cfg: RewardModelConfig) -> torch.optim.Optimizer:
    return encoder_optimizer(model, cfg.encoder_lr, cfg.head_lr, cfg.weight_decay)


def train_reward_model(
    model: RewardModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    ratings: Sequence[RatingExample],
    pointwise: Sequence[PointwiseExample],
    cfg: RewardModelConfig,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    guard: LossGuard | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Train in place for `cfg.epochs` over all examples, mixed in each batch; returns loss metrics.

    Each batch is one forward pass over its chosen, rejected and pointwise responses, with
        loss = (sum BT + rating_coef * sum MSE + pointwise_coef * sum BCE) / batch size.
    """
    items = [("pair", i) for i in range(len(pairs))]
    items += [("rating", i) for i in range(len(ratings))]
    items += [("pointwise", i) for i in range(len(pointwise))]
    if not items:
        return {"steps": 0.0}
    optimizer = optimizer or make_optimizer(model, cfg)
    guard = guard or LossGuard("reward")
    steps_per_epoch = math.ceil(len(items) / cfg.batch_size)
    steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    model.train()
    order: list[int] = []
    totals = {"loss": 0.0, "bt_loss": 0.0, "rating_loss": 0.0, "pointwise_loss": 0.0}
    for step in range(steps):
        if len(order) < cfg.batch_size:
            order += torch.randperm(len(items), generator=generator).tolist()
        batch, order = [items[j] for j in order[: cfg.batch_size]], order[cfg.batch_size :]
        bp = [pairs[i] for kind, i in batch if kind == "pair"]
        br = [ratings[i] for kind, i in batch if kind == "rating"]
        ba = [pointwise[i] for kind, i in batch if kind == "pointwise"]
        # One forward pass: [chosen..., rejected..., rated..., accepted/rejected...]
        prompts = [p.prompt for p in bp] * 2 + [x.prompt for x in br] + [x.prompt for x in ba]
        responses = [p.chosen for p in bp] + [p.rejected for p in bp]
        responses += [x.response for x in br] + [x.response for x in ba]
        r = rewards(model, tokenizer, prompts, responses, cfg.max_length)  # (2P + R + A,)
        n_p, n_r = len(bp), len(br)
        r_c, r_r = r[:n_p], r[n_p : 2 * n_p]  # (P,), (P,)
        r_rate, r_point = r[2 * n_p : 2 * n_p + n_r], r[2 * n_p + n_r :]  # (R,), (A,)
        t_rate = torch.tensor([x.target for x in br], dtype=r.dtype, device=r.device)  # (R,)
        t_point = torch.tensor([x.target for x in ba], dtype=r.dtype, device=r.device)  # (A,)
        bt = bradley_terry_loss(r_c, r_r).sum()
        mse = rating_loss(r_rate, t_rate).sum()
        bce = pointwise_loss(r_point, t_point).sum()
        loss = (bt + cfg.rating_coef * mse + cfg.pointwise_coef * bce) / len(batch)
        guard.check(step, loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        totals["loss"] += loss.item()
        totals["bt_loss"] += bt.item() / max(n_p, 1)
        totals["rating_loss"] += mse.item() / max(n_r, 1)
        totals["pointwise_loss"] += bce.item() / max(len(ba), 1)
    model.eval()
    out = {k: v / steps for k, v in totals.items()}
    out["steps"] = float(steps)
    return out


@torch.no_grad()
def evaluate_pairwise_accuracy(
    model: RewardModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    cfg: RewardModelConfig,
) -> float:
    """Share of pairs with r_chosen > r_rejected (ties count half); NaN with no pairs."""
    if not pairs:
        return float("nan")
    return float(pairwise_scores(model, tokenizer, pairs, cfg).mean())


@torch.no_grad()
def pairwise_scores(
    model: RewardModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    cfg: RewardModelConfig,
) -> torch.Tensor:
    """Per pair: 1 when r_chosen > r_rejected, 0.5 on a tie, else 0: (P,)."""
    model.eval()
    out = []
    bs = max(1, cfg.eval_batch_size // 2)
    for i in range(0, len(pairs), bs):
        chunk = pairs[i : i + bs]
        prompts = [p.prompt for p in chunk] * 2
        responses = [p.chosen for p in chunk] + [p.rejected for p in chunk]
        r = rewards(model, tokenizer, prompts, responses, cfg.max_length)  # (2P,)
        r_c, r_r = r[: len(chunk)], r[len(chunk) :]
        out.append((r_c > r_r).float() + 0.5 * (r_c == r_r).float())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def evaluate_reward_model(
    model: RewardModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    ratings: Sequence[RatingExample],
    pointwise: Sequence[PointwiseExample],
    cfg: RewardModelConfig,
) -> dict[str, float]:
    """Held-out metrics: pairwise accuracy (the gate's), rating MSE and accept/reject accuracy."""
    model.eval()
    out = {
        "pairwise_accuracy": evaluate_pairwise_accuracy(model, tokenizer, pairs, cfg),
        "n_pairs": float(len(pairs)),
    }
    for name, xs in (("rating", ratings), ("pointwise", pointwise)):
        if not xs:
            continue
        r = torch.cat(
            [
                rewards(
                    model,
                    tokenizer,
                    [x.prompt for x in xs[i : i + cfg.eval_batch_size]],
                    [x.response for x in xs[i : i + cfg.eval_batch_size]],
                    cfg.max_length,
                )
                for i in range(0, len(xs), cfg.eval_batch_size)
            ]
        )  # (N,)
        t = torch.tensor([x.target for x in xs], dtype=r.dtype)
        if name == "rating":
            out["rating_mse"] = rating_loss(r, t).mean().item()
        else:
            out["pointwise_accuracy"] = ((r > 0).float() == t).float().mean().item()
        out[f"n_{name}"] = float(len(xs))
    return out


def reference_pairs(
    pairs: Sequence[PreferencePair],
    ratings: Sequence[RatingExample],
    pointwise: Sequence[PointwiseExample],
    limit: int,
) -> list[tuple[str, str]]:
    """The reference set of a reward version's statistics: held-out served responses (both sides of
    each pair, the rated and the accepted / rejected ones), oldest first, so that once full it is the
    same set for every later version and their normalised scales agree."""
    rows = [(p.seq, p.prompt, p.chosen) for p in pairs] + [(p.seq, p.prompt, p.rejected) for p in pairs]
    rows += [(x.seq, x.prompt, x.response) for x in ratings]
    rows += [(x.seq, x.prompt, x.response) for x in pointwise]
    rows.sort(key=lambda row: row[0])
    return [(prompt, response) for _, prompt, response in rows[:limit]]


@torch.no_grad()
def reward_statistics(
    model: RewardModel,
    tokenizer: PreTrainedTokenizerBase,
    reference: Sequence[tuple[str, str]],
    cfg: RewardModelConfig,
) -> RewardStats:
    """Mean and std of r over `reference` (the service's builtin pairs when it is empty), as the reward
    service normalises with: Score(normalised) = clip((r - mean) / std)."""
    source = "publish" if reference else "builtin"
    reference = list(reference) or list(BUILTIN_REFERENCE_PAIRS)
    model.eval()
    r = [
        rewards(model, tokenizer, [p for p, _ in chunk], [x for _, x in chunk], cfg.max_length).float()
        for chunk in (reference[i : i + cfg.eval_batch_size] for i in range(0, len(reference), cfg.eval_batch_size))
    ]
    return RewardStats.of(torch.cat(r).cpu().tolist(), source)
