"""Online RL for the generator with group-relative baselines (GRPO / RLOO), KL-leashed to a reference.

For each step: draw a batch of prompts, sample a group of k completions per prompt from the current
policy pi_theta, score every (prompt, completion) with the reward function (the reward service), and
use the other members of the group as the baseline, so no value network is needed:

    RLOO (Ahmadian et al., 2024; Kool et al., 2019):  A_i = r_i - 1/(k-1) sum_{j != i} r_j
    GRPO (Shao et al., 2024, DeepSeekMath):           the same, divided by the group's std (`scale_rewards`)

The loss, per completion token t of sample i (the samples are fresh, so this is on-policy):

    loss_{i,t} = -A_i * log pi_theta(y_t | x, y_<t) + beta * KL_t
    KL_t = exp(log pi_ref - log pi_theta) - (log pi_ref - log pi_theta) - 1     (Schulman's k3, >= 0)

averaged over all completion tokens of the batch (token-level, as in DAPO, Yu et al., 2025, so long
completions are not down-weighted). pi_ref is the frozen base model: the KL term keeps the policy
from drifting into text the reward model was never trained on (reward hacking).

Optional LoRA on q_proj / v_proj (causal_lm.add_lora); the adapters are merged before saving, so the
published version is a plain model the policy service loads like any other.

Evaluation: mean reward over held-out prompts with fixed-seed sampling (the same seed for candidate
and serving version, so the comparison is paired) and the mean per-token KL to the reference.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer.causal_lm import Sampler, autocast, completion_logprobs, precision_dtype, sample
from trainer.gate import LossGuard
from trainer.optim import lm_optimizer

logger = logging.getLogger(__name__)


class RewardFn(Protocol):
    """Scores (prompt, response) pairs; in production a client of the reward service's Score."""

    def __call__(self, pairs: Sequence[tuple[str, str]], /) -> Sequence[float]: ...


class RewardUnavailable(RuntimeError):
    """The reward function failed (service down, deadline, refused): back off and retry later."""


@dataclass
class GRPOConfig:
    group_size: int = 8
    """k: completions sampled per prompt; the group is each sample's baseline."""
    prompts_per_step: int = 4
    """Prompts per optimizer step (batch = prompts_per_step * group_size sequences)."""
    steps: int = 8
    """Optimizer steps (each on fresh samples) per round."""
    max_new_tokens: int = 48
    """Completion length cap while sampling."""
    max_prompt_tokens: int = 256
    """Prompts keep their last this-many tokens."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are taken at the same temperature."""
    lr: float = 1e-5
    """AdamW learning rate (use ~1e-4 with LoRA)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    beta: float = 0.04
    """KL penalty coefficient."""
    scale_rewards: bool = True
    """Divide advantages by the group's reward std (GRPO); False gives plain RLOO."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template, as the policy service does by default."""
    eval_samples: int = 2
    """Completions per held-out prompt in evaluation."""
    eval_seed: int = 1234
    """Sampling seed of the evaluation (identical for candidate and serving version)."""
    eval_batch_prompts: int = 8
    """Held-out prompts per sampling call in evaluation."""
    precision: str = "auto"
    """fp32 | bf16 | auto (bf16 on CUDA, fp32 on CPU). bf16: rollouts are sampled from a bf16 copy of
    the policy and forward passes run under autocast; weights, gradients and the optimizer stay fp32."""


def group_advantages(rewards: torch.Tensor, scale: bool) -> torch.Tensor:
    """rewards (P, k) -> advantages (P, k): leave-one-out baseline, optionally / group std."""
    k = rewards.shape[-1]
    baseline = (rewards.sum(-1, keepdim=True) - rewards) / max(k - 1, 1)  # (P, k): mean of the others
    advantages = rewards - baseline
    if scale:
        advantages = advantages / (rewards.std(-1, keepdim=True) + 1e-4)
    return advantages


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi: (B, C) -> (B, C), >= 0."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def grpo_loss(
    logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """logp, ref_logp, mask (B, C); advantages (B,) -> (scalar loss, mean per-token KL)."""
    mask = mask.to(logp.dtype)
    pg = -advantages[:, None] * logp  # (B, C)
    kl = kl_k3(logp, ref_logp)  # (B, C)
    n_tokens = mask.sum().clamp(min=1)
    loss = ((pg + beta * kl) * mask).sum() / n_tokens
    return loss, (kl * mask).sum().detach() / n_tokens


def score(reward_fn: RewardFn, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
    """Rewards as a (B,) tensor; any failure of the reward function becomes RewardUnavailable."""
    try:
        scores = list(reward_fn(list(zip(prompts, responses, strict=True))))
    except Exception as e:  # the reward service is another process: any failure means "try later"
        raise RewardUnavailable(f"reward function failed: {type(e).__name__}") from e
    if len(scores) != len(prompts):
        raise RewardUnavailable(f"reward function returned {len(scores)} scores for {len(prompts)} pairs")
    return torch.tensor(scores, dtype=torch.float32)


def make_optimizer(policy: PreTrainedModel, cfg: GRPOConfig) -> torch.optim.Optimizer:
    return lm_optimizer(policy, cfg.lr, cfg.weight_decay)


def train_grpo(
    policy: PreTrainedModel,
    ref: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    cfg: GRPOConfig,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    guard: LossGuard | None = None,
    rng: random.Random | None = None,
) -> dict[str, float]:
    """`cfg.steps` GRPO/RLOO steps in place on `policy`; `ref` stays frozen. Returns mean metrics."""
    if not prompts:
        return {"steps": 0.0}
    rng = rng or random.Random(0)
    optimizer = optimizer or make_optimizer(policy, cfg)
    guard = guard or LossGuard("generator_rl")
    k = cfg.group_size
    device = next(policy.parameters()).device
    dtype = precision_dtype(cfg.precision, device)
    sampler = Sampler(policy, dtype)
    totals = {"loss": 0.0, "reward": 0.0, "kl": 0.0, "completion_tokens": 0.0}
    for step in range(cfg.steps):
        batch_prompts = rng.sample(list(prompts), min(cfg.prompts_per_step, len(prompts)))
        sampler.sync(policy)
        rollout = sample(
            sampler.model,
            tokenizer,
            batch_prompts,
            k,
            max_new_tokens=cfg.max_new_tokens,
            max_prompt_tokens=cfg.max_prompt_tokens,
            temperature=cfg.temperature,
            chat_template=cfg.chat_template,
        )
        repeated = [p for p in batch_prompts for _ in range(k)]
        rewards = score(reward_fn, repeated, rollout.texts).view(-1, k)  # (P, k)
        advantages = group_advantages(rewards, cfg.scale_rewards).flatten()  # (B,)
        policy.train()
        args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
        with autocast(device, dtype):
            logp = completion_logprobs(policy, *args, temperature=cfg.temperature)  # (B, C)
            with torch.no_grad():
                ref_logp = completion_logprobs(ref, *args, temperature=cfg.temperature)  # (B, C)
        mask = rollout.completion_mask.to(logp.device)
        loss, kl = grpo_loss(logp, ref_logp, advantages.to(logp.device), mask, cfg.beta)
        guard.check(step, loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        totals["loss"] += loss.item()
        totals["reward"] += rewards.mean().item()
        totals["kl"] += kl.item()
        totals["completion_tokens"] += mask.sum().item() / mask.shape[0]
        logger.debug("grpo step %d: reward %.4f kl %.4f", step, rewards.mean().item(), kl.item())
    policy.eval()
    out = {key: v / cfg.steps for key, v in totals.items()}
    out["steps"] = float(cfg.steps)
    return out


@torch.no_grad()
def evaluate_policy(
    policy: PreTrainedModel,
    ref: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    cfg: GRPOConfig,
) -> dict[str, float]:
    """Mean reward and mean per-token KL(pi || pi_ref) on held-out prompts, sampled with `cfg.eval_seed`
    (the training RNG is left as it was)."""
    if not prompts:
        return {"mean_reward": float("nan"), "kl": float("nan"), "n_prompts": 0.0}
    rewards, kl_sum, n_tokens = [], 0.0, 0.0
    device = next(policy.parameters()).device
    dtype = precision_dtype(cfg.precision, device)
    sampler = Sampler(policy, dtype)  # the same sampling path as training: what the gate compares
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast(device, dtype):
        torch.manual_seed(cfg.eval_seed)
        for i in range(0, len(prompts), cfg.eval_batch_prompts):
            chunk = list(prompts[i : i + cfg.eval_batch_prompts])
            rollout = sample(
                sampler.model,
                tokenizer,
                chunk,
                cfg.eval_samples,
                max_new_tokens=cfg.max_new_tokens,
                max_prompt_tokens=cfg.max_prompt_tokens,
                temperature=cfg.temperature,
                chat_template=cfg.chat_template,
            )
            repeated = [p for p in chunk for _ in range(cfg.eval_samples)]
            rewards.append(score(reward_fn, repeated, rollout.texts))
            args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
            logp = completion_logprobs(policy, *args, temperature=cfg.temperature)  # (B, C)
            ref_logp = completion_logprobs(ref, *args, temperature=cfg.temperature)  # (B, C)
            mask = rollout.completion_mask.to(logp.device).float()
            kl_sum += (kl_k3(logp, ref_logp) * mask).sum().item()
            n_tokens += mask.sum().item()
    return {
        "mean_reward": torch.cat(rewards).mean().item(),
        "kl": kl_sum / max(n_tokens, 1.0),
        "n_prompts": float(len(prompts)),
    }
