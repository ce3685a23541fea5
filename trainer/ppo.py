"""PPO for the generator with a value network, GAE, and the KL penalty to the reference in the reward.

The RL step of InstructGPT (Ouyang et al., 2022) after Ziegler et al. (2019), "Fine-Tuning Language
Models from Human Preferences", with the PPO of Schulman et al. (2017) and GAE of Schulman et al.
(2016). Laid out like cleanrl's ppo.py: roll out, compute advantages, then several epochs of
minibatch updates on the same rollouts. One token is one action; a completion is one episode.

Rollout: for a batch of prompts x, sample completions y ~ pi_old (the policy as it was when sampled)
and record, per completion token t (mask m_t):

    logprobs_t  = log pi_old(y_t | x, y_<t)          ref_logprobs_t = log pi_ref(y_t | x, y_<t)
    values_t    = V_old(s_t)                          (s_t: the prompt and y_<t)

Reward, with the KL penalty to the reference folded in (Ziegler et al., eq. 2; InstructGPT's
"per-token KL penalty from the SFT model"), R the reward service's (normalised) score of (x, y):

    rewards_t = -beta * (logprobs_t - ref_logprobs_t)   + R  at the last completion token T

GAE (gamma, lambda), bootstrapping with 0 after the episode's last token:

    delta_t      = rewards_t + gamma * V(s_{t+1}) - V(s_t)
    advantages_t = delta_t + gamma * lambda * advantages_{t+1}
    returns_t    = advantages_t + V(s_t)

PPO epochs: `update_epochs` passes over the rollout batch in `num_minibatches` shuffled minibatches,

    ratio      = exp(newlogprob - logprobs)
    pg_loss    = mean_t max(-A_t * ratio, -A_t * clip(ratio, 1 - clip_coef, 1 + clip_coef))
    v_clipped  = values + clip(newvalue - values, -clip_coef, clip_coef)
    v_loss     = 0.5 * mean_t max((newvalue - returns)^2, (v_clipped - returns)^2)
    loss       = pg_loss + vf_coef * v_loss

(advantages whitened over the rollout batch's completion tokens; means are over completion tokens).

The value network: a linear head on the policy's own last hidden state (a shared trunk, as in Ziegler
et al. and TRL's value-head model), initialised to zero, not InstructGPT's copy of the reward model.
Why: the reward model here is a MiniLM cross-encoder with its own tokenizer, so a value per generator
token would need one encoder pass per completion prefix (C passes per sample) and an alignment of two
tokenisations; the policy trunk gives V(s_t) for every token from the forward pass that already
computes the log-probs, for one (H, 1) layer. The head is trained only during a round (it is not part
of the published model, which stays a plain causal LM): each round starts it at zero, so its first
updates are pure value learning while the policy's advantages are mostly the reward itself.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer.causal_lm import (
    Rollout,
    Sampler,
    autocast,
    completion_forward,
    completion_logprobs,
    precision_dtype,
    sample,
    selective_log_softmax,
)
from trainer.gate import LossGuard
from trainer.generation_rl import RewardFn, score

logger = logging.getLogger(__name__)


@dataclass
class PPOConfig:
    prompts_per_step: int = 8
    """Prompts per rollout batch."""
    samples_per_prompt: int = 2
    """Completions per prompt (batch = prompts_per_step * samples_per_prompt sequences)."""
    steps: int = 4
    """Rollout batches per round (each followed by `update_epochs` epochs of updates)."""
    update_epochs: int = 4
    """K: PPO epochs over each rollout batch."""
    num_minibatches: int = 2
    """Minibatches per epoch (sequences are shuffled each epoch)."""
    max_new_tokens: int = 48
    """Completion length cap while sampling."""
    max_prompt_tokens: int = 256
    """Prompts keep their last this-many tokens."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are taken at the same temperature."""
    lr: float = 1e-5
    """AdamW learning rate of the policy (use ~1e-4 with LoRA)."""
    value_lr: float = 1e-3
    """AdamW learning rate of the (freshly initialised) value head."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    beta: float = 0.05
    """KL penalty coefficient, per token, in the reward."""
    gamma: float = 1.0
    """Discount (1: the episode is one short completion)."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    clip_coef: float = 0.2
    """Clip range of the probability ratio (and of the value update)."""
    vf_coef: float = 0.1
    """Weight of the value loss (the trunk is shared: a large weight would let it steer the policy)."""
    clip_vloss: bool = True
    """Clip the value update around the rollout's values."""
    norm_adv: bool = True
    """Whiten advantages over the rollout batch's completion tokens."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template, as the policy service does by default."""
    precision: str = "auto"
    """fp32 | bf16 | auto (bf16 on CUDA, fp32 on CPU): as GRPOConfig.precision."""


class ValueHead(nn.Module):
    """V(s_t) = w . h_t + b on the policy's last hidden state h_t: (B, C, H) -> (B, C). Zero at init."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def value_head_for(policy: PreTrainedModel) -> ValueHead:
    device = next(policy.parameters()).device
    return ValueHead(int(policy.config.hidden_size)).to(device)


def logprobs_and_values(
    policy: PreTrainedModel, value_head: ValueHead, rollout: Rollout, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: log pi(y_t | s_t) and V(s_t) for each completion token, (B, C) and (B, C).

    As causal_lm.completion_logprobs (same layout, same positions), plus the last hidden state at the
    positions whose logits predict the completion tokens: the state s_t before token t."""
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    logits, hidden = completion_forward(policy, *args, hidden=True)  # (B, C, V), (B, C, H): after the final norm
    assert hidden is not None
    logprobs = selective_log_softmax(logits.float() / temperature, rollout.completion_ids.to(logits.device))  # (B, C)
    return logprobs, value_head(hidden)  # (B, C), (B, C)


def ref_logprobs_of(ref: PreTrainedModel, rollout: Rollout, temperature: float) -> torch.Tensor:
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    return completion_logprobs(ref, *args, temperature=temperature)  # (B, C)


def kl_penalised_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (B,); logprobs, ref_logprobs, mask (B, C) -> (rewards (B, C), per-token KL estimate (B, C)).

    rewards_t = -beta * (logprobs_t - ref_logprobs_t) on every completion token, plus the score on the
    last one (k1 estimator of KL(pi || pi_ref), unbiased for tokens sampled from pi)."""
    mask = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask  # (B, C)
    rewards = -beta * kl  # (B, C)
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # (B,): index of each completion's last token
    rewards[torch.arange(rewards.shape[0]), last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards, values, mask (B, C) -> (advantages (B, C), returns (B, C)); 0 past each episode's end."""
    mask = mask.to(values.dtype)
    values = values * mask
    c = rewards.shape[1]
    advantages = torch.zeros_like(rewards)  # (B, C)
    lastgaelam = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(c)):
        nextvalues = values[:, t + 1] if t + 1 < c else torch.zeros_like(values[:, 0])  # (B,), 0 after EOS
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]  # (B,)
        lastgaelam = delta + gamma * lam * lastgaelam * (mask[:, t + 1] if t + 1 < c else 0.0)
        advantages[:, t] = lastgaelam
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask.to(x.dtype)


def ppo_losses(
    newlogprob: torch.Tensor,
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    newvalue: torch.Tensor,
    values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cfg: PPOConfig,
) -> dict[str, torch.Tensor]:
    """Every input (b, C) -> the clipped policy loss, the (clipped) value loss, and diagnostics."""
    logratio = newlogprob - logprobs  # (b, C)
    ratio = logratio.exp()  # (b, C)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - cfg.clip_coef, 1 + cfg.clip_coef)
    pg_loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    v_loss_unclipped = (newvalue - returns) ** 2  # (b, C)
    if cfg.clip_vloss:
        v_clipped = values + torch.clamp(newvalue - values, -cfg.clip_coef, cfg.clip_coef)
        v_loss = 0.5 * masked_mean(torch.max(v_loss_unclipped, (v_clipped - returns) ** 2), mask)
    else:
        v_loss = 0.5 * masked_mean(v_loss_unclipped, mask)
    with torch.no_grad():
        approx_kl = masked_mean((ratio - 1) - logratio, mask)  # KL(pi_old || pi_theta), k3
        clipfrac = masked_mean(((ratio - 1.0).abs() > cfg.clip_coef).float(), mask)
    return {
        "loss": pg_loss + cfg.vf_coef * v_loss,
        "pg_loss": pg_loss,
        "v_loss": v_loss,
        "approx_kl": approx_kl,
        "clipfrac": clipfrac,
    }


PER_UPDATE = ("pg_loss", "v_loss", "approx_kl", "clipfrac")
"""Metrics averaged over every minibatch update (the others over rollout batches)."""


def make_optimizer(policy: PreTrainedModel, value_head: ValueHead, cfg: PPOConfig) -> torch.optim.Optimizer:
    """AdamW: the policy's trainable parameters at `lr`, the value head at `value_lr`."""
    return torch.optim.AdamW(
        [
            {"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.lr},
            {"params": list(value_head.parameters()), "lr": cfg.value_lr},
        ],
        weight_decay=cfg.weight_decay,
    )


def train_ppo(
    policy: PreTrainedModel,
    ref: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    cfg: PPOConfig,
    *,
    value_head: ValueHead | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    guard: LossGuard | None = None,
    rng: random.Random | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """`cfg.steps` PPO iterations in place on `policy` (and `value_head`); `ref` stays frozen.

    Returns means over the iterations, and the value loss of each iteration's first and last epoch
    (`v_loss_first_epoch`, `v_loss_last_epoch`): the value head fitting its returns shows as a drop."""
    if not prompts:
        return {"steps": 0.0}
    rng = rng or random.Random(0)
    value_head = value_head or value_head_for(policy)
    optimizer = optimizer or make_optimizer(policy, value_head, cfg)
    guard = guard or LossGuard("ppo")
    device = next(policy.parameters()).device
    dtype = precision_dtype(cfg.precision, device)
    sampler = Sampler(policy, dtype)
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    keys = ("reward", "kl", "pg_loss", "v_loss", "approx_kl", "clipfrac", "v_loss_first_epoch", "v_loss_last_epoch")
    totals = dict.fromkeys(keys, 0.0)
    update = 0
    for step in range(cfg.steps):
        # ---- rollout: sample from pi_old, score, record log-probs and values ----------------------
        batch_prompts = rng.sample(list(prompts), min(cfg.prompts_per_step, len(prompts)))
        sampler.sync(policy)
        rollout = sample(
            sampler.model,
            tokenizer,
            batch_prompts,
            cfg.samples_per_prompt,
            max_new_tokens=cfg.max_new_tokens,
            max_prompt_tokens=cfg.max_prompt_tokens,
            temperature=cfg.temperature,
            chat_template=cfg.chat_template,
        )
        repeated = [p for p in batch_prompts for _ in range(cfg.samples_per_prompt)]
        scores = score(reward_fn, repeated, rollout.texts).to(device)  # (B,)
        mask = rollout.completion_mask.to(device)  # (B, C)
        with torch.no_grad(), autocast(device, dtype):
            policy.eval()
            logprobs, values = logprobs_and_values(policy, value_head, rollout, cfg.temperature)  # (B, C) x 2
            ref_logprobs = ref_logprobs_of(ref, rollout, cfg.temperature)  # (B, C)
        rewards, kl = kl_penalised_rewards(scores, logprobs, ref_logprobs, mask, cfg.beta)  # (B, C) x 2
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)  # (B, C) x 2
        if cfg.norm_adv:
            advantages = masked_whiten(advantages, mask)

        # ---- K epochs of minibatch updates on this rollout ----------------------------------------
        b = rollout.completion_ids.shape[0]
        minibatch_size = max(1, b // cfg.num_minibatches)
        policy.train()
        epoch_v_loss: list[float] = []
        for _epoch in range(cfg.update_epochs):
            b_inds = torch.randperm(b, generator=generator)
            v_sum, n_mb = 0.0, 0
            for start in range(0, b, minibatch_size):
                mb = b_inds[start : start + minibatch_size]
                mb_rollout = Rollout(
                    rollout.prompt_ids[mb],
                    rollout.prompt_mask[mb],
                    rollout.completion_ids[mb],
                    rollout.completion_mask[mb],
                    [rollout.texts[i] for i in mb.tolist()],
                )
                with autocast(device, dtype):
                    newlogprob, newvalue = logprobs_and_values(policy, value_head, mb_rollout, cfg.temperature)
                out = ppo_losses(
                    newlogprob,
                    logprobs[mb],
                    advantages[mb],
                    newvalue,
                    values[mb],
                    returns[mb],
                    mask[mb],
                    cfg,
                )
                guard.check(update, out["loss"].item())
                update += 1
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                v_sum, n_mb = v_sum + out["v_loss"].item(), n_mb + 1
                for key in PER_UPDATE:
                    totals[key] += out[key].item()
            epoch_v_loss.append(v_sum / max(n_mb, 1))
        totals["reward"] += scores.mean().item()
        totals["kl"] += masked_mean(kl, mask).item()
        totals["v_loss_first_epoch"] += epoch_v_loss[0]
        totals["v_loss_last_epoch"] += epoch_v_loss[-1]
        logger.debug("ppo step %d: reward %.4f kl %.4f", step, scores.mean().item(), masked_mean(kl, mask).item())
    policy.eval()
    out_metrics = {key: v / (max(update, 1) if key in PER_UPDATE else cfg.steps) for key, v in totals.items()}
    out_metrics["steps"] = float(cfg.steps)
    out_metrics["updates"] = float(update)
    return out_metrics
