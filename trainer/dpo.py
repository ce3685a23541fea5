"""Direct Preference Optimization (Rafailov et al., 2023) from logged preference pairs of generations.

With sequence log-probabilities of the completion tokens only (the prompt is given, not generated),
under the policy pi_theta and the frozen reference pi_ref:

    h = (log pi_theta(y_c | x) - log pi_ref(y_c | x)) - (log pi_theta(y_r | x) - log pi_ref(y_r | x))
    loss = -log sigmoid(beta * h)

beta * h is the margin between the implicit rewards of chosen and rejected; training raises it. The
pairs come straight from the log (two served generations, or a prompt and two texts, or an edit
preferred over what was served), so no reward model is involved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer.causal_lm import encode_completions, encode_prompts, sequence_logprobs
from trainer.examples import PreferencePair
from trainer.gate import LossGuard
from trainer.optim import lm_optimizer


@dataclass
class DPOConfig:
    beta: float = 0.1
    """Strength of the implicit KL leash: smaller lets the policy move further from the reference."""
    lr: float = 1e-6
    """AdamW learning rate (use ~5e-5 with LoRA)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 8
    """Pairs per optimizer step (2 x batch_size sequences)."""
    epochs: float = 1.0
    """Passes over the pairs per round."""
    max_steps: int = 0
    """Cap on optimizer steps per round; 0 means no cap."""
    max_prompt_tokens: int = 256
    """Prompts keep their last this-many tokens."""
    max_completion_tokens: int = 256
    """Completions keep their first this-many tokens."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    chat_template: bool = True
    """Wrap prompts in the chat template, as the policy service did when it served them."""
    eval_batch_size: int = 16
    """Pairs per forward pass in evaluation."""


def dpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs, each (P,) -> (loss (P,), implicit reward margin (P,))."""
    h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)  # (P,)
    return -F.logsigmoid(beta * h), (beta * h).detach()


def pair_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    cfg: DPOConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(chosen | prompt), log pi(rejected | prompt): (P,), (P,), from 2P rows whose pair shares its
    prompt's pass (causal_lm.completion_forward)."""
    prompt_ids, prompt_mask = encode_prompts(
        tokenizer, [p.prompt for p in pairs], cfg.max_prompt_tokens, cfg.chat_template
    )  # (P, T_p)
    completion_ids, completion_mask = encode_completions(
        tokenizer, [p.chosen for p in pairs] + [p.rejected for p in pairs], cfg.max_completion_tokens
    )  # (2P, T_c)
    logp = sequence_logprobs(
        model, prompt_ids.repeat(2, 1), prompt_mask.repeat(2, 1), completion_ids, completion_mask
    )  # (2P,)
    return logp[: len(pairs)], logp[len(pairs) :]


def make_optimizer(policy: PreTrainedModel, cfg: DPOConfig) -> torch.optim.Optimizer:
    return lm_optimizer(policy, cfg.lr, cfg.weight_decay)


def train_dpo(
    policy: PreTrainedModel,
    ref: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    cfg: DPOConfig,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    guard: LossGuard | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Train `policy` in place for `cfg.epochs` over `pairs`; `ref` stays frozen."""
    if not pairs:
        return {"steps": 0.0}
    optimizer = optimizer or make_optimizer(policy, cfg)
    guard = guard or LossGuard("dpo")
    steps = max(1, math.ceil(cfg.epochs * math.ceil(len(pairs) / cfg.batch_size)))
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    order: list[int] = []
    totals = {"loss": 0.0, "margin": 0.0, "accuracy": 0.0}
    for step in range(steps):
        if len(order) < cfg.batch_size:
            order += torch.randperm(len(pairs), generator=generator).tolist()
        batch, order = [pairs[j] for j in order[: cfg.batch_size]], order[cfg.batch_size :]
        with torch.no_grad():
            ref_c, ref_r = pair_logprobs(ref, tokenizer, batch, cfg)  # (P,), (P,)
        policy.train()
        pi_c, pi_r = pair_logprobs(policy, tokenizer, batch, cfg)  # (P,), (P,)
        losses, margins = dpo_loss(pi_c, pi_r, ref_c.to(pi_c.device), ref_r.to(pi_c.device), cfg.beta)
        loss = losses.mean()
        guard.check(step, loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        totals["loss"] += loss.item()
        totals["margin"] += margins.mean().item()
        totals["accuracy"] += (margins > 0).float().mean().item()
    policy.eval()
    out = {f"dpo_{key}": v / steps for key, v in totals.items()}
    out["steps"] = float(steps)
    return out


@torch.no_grad()
def evaluate_dpo(
    policy: PreTrainedModel,
    ref: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    cfg: DPOConfig,
) -> dict[str, float]:
    """Mean implicit-reward margin beta * h, share of pairs with a positive margin, and mean loss."""
    if not pairs:
        return {"dpo_margin": float("nan"), "dpo_accuracy": float("nan"), "dpo_loss": float("nan")}
    policy.eval()
    losses, margins = [], []
    for i in range(0, len(pairs), cfg.eval_batch_size):
        chunk = pairs[i : i + cfg.eval_batch_size]
        pi_c, pi_r = pair_logprobs(policy, tokenizer, chunk, cfg)
        ref_c, ref_r = pair_logprobs(ref, tokenizer, chunk, cfg)
        loss, margin = dpo_loss(pi_c, pi_r, ref_c, ref_r, cfg.beta)
        losses.append(loss.cpu())
        margins.append(margin.cpu())
    m = torch.cat(margins)
    return {
        "dpo_margin": m.mean().item(),
        "dpo_accuracy": (m > 0).float().mean().item(),
        "dpo_loss": torch.cat(losses).mean().item(),
    }
