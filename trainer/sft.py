"""Supervised fine-tuning of the generator on demonstrations: the first stage of the RLHF pipeline
(Ouyang et al., 2022, InstructGPT: SFT, then a reward model, then RL under a KL penalty to the SFT policy).

A demonstration is a prompt x and the response y a person wrote or corrected (an `Edit` of a served
generation, or a demonstration brought in with `loopserve log import --demonstrations`). The loss is
the cross-entropy of the response tokens only, the prompt being given, not generated:

    loss = - sum_{i,t} m_{i,t} log pi_theta(y_{i,t} | x_i, y_{i,<t}) / sum_{i,t} m_{i,t}

(token-level mean over the batch, m the response mask, EOS included: a demonstration ends there).

The gate compares the same quantity on held-out demonstrations (never trained on, split by prompt
content): the candidate's mean per-token negative log-likelihood must fall below the serving version's.
A version published by a round whose only objective was SFT is marked `objective: sft` in its
manifest; the generator's RL rounds take the newest such version as the reference policy pi_ref of
their KL term (trainer/loop.py, `reference_version`), as InstructGPT leashes PPO to its SFT model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer.causal_lm import autocast, completion_logprobs, encode_completions, encode_prompts, precision_dtype
from trainer.examples import Demonstration
from trainer.gate import LossGuard
from trainer.optim import lm_optimizer


@dataclass
class SFTConfig:
    lr: float = 1e-5
    """AdamW learning rate (use ~1e-4 with LoRA)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 8
    """Demonstrations per optimizer step."""
    epochs: float = 1.0
    """Passes over the demonstrations per round."""
    max_steps: int = 0
    """Cap on optimizer steps per round; 0 means no cap."""
    max_prompt_tokens: int = 256
    """Prompts keep their last this-many tokens."""
    max_completion_tokens: int = 256
    """Responses keep their first this-many tokens."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    chat_template: bool = True
    """Wrap prompts in the chat template, as the policy service does when it serves them."""
    eval_batch_size: int = 16
    """Demonstrations per forward pass in evaluation."""
    precision: str = "auto"
    """fp32 | bf16 | auto (bf16 on CUDA, fp32 on CPU): forward passes under autocast, weights fp32."""


def sft_loss(logp: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logp, mask (B, C) -> (token-mean NLL, the number of response tokens)."""
    mask = mask.to(logp.dtype)
    n_tokens = mask.sum().clamp(min=1)
    return -(logp * mask).sum() / n_tokens, n_tokens.detach()


def response_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    demos: Sequence[Demonstration],
    cfg: SFTConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_t | x, y_<t) of every response token and the response mask: (B, C), (B, C)."""
    prompt_ids, prompt_mask = encode_prompts(
        tokenizer, [d.prompt for d in demos], cfg.max_prompt_tokens, cfg.chat_template
    )  # (B, P)
    completion_ids, completion_mask = encode_completions(
        tokenizer, [d.response for d in demos], cfg.max_completion_tokens
    )  # (B, C)
    logp = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)  # (B, C)
    return logp, completion_mask.to(logp.device)


def make_optimizer(policy: PreTrainedModel, cfg: SFTConfig) -> torch.optim.Optimizer:
    return lm_optimizer(policy, cfg.lr, cfg.weight_decay)


def train_sft(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    demos: Sequence[Demonstration],
    cfg: SFTConfig,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    guard: LossGuard | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Train `policy` in place for `cfg.epochs` over `demos`; returns the mean training loss."""
    if not demos:
        return {"steps": 0.0}
    optimizer = optimizer or make_optimizer(policy, cfg)
    guard = guard or LossGuard("sft")
    device = next(policy.parameters()).device
    dtype = precision_dtype(cfg.precision, device)
    steps = max(1, math.ceil(cfg.epochs * math.ceil(len(demos) / cfg.batch_size)))
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    order: list[int] = []
    total = 0.0
    policy.train()
    for step in range(steps):
        if len(order) < cfg.batch_size:
            order += torch.randperm(len(demos), generator=generator).tolist()
        batch, order = [demos[j] for j in order[: cfg.batch_size]], order[cfg.batch_size :]
        with autocast(device, dtype):
            logp, mask = response_logprobs(policy, tokenizer, batch, cfg)  # (B, C), (B, C)
        loss, _ = sft_loss(logp, mask)
        guard.check(step, loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        total += loss.item()
    policy.eval()
    return {"sft_loss": total / steps, "steps": float(steps)}


@torch.no_grad()
def evaluate_sft(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    demos: Sequence[Demonstration],
    cfg: SFTConfig,
) -> dict[str, float]:
    """Mean per-token NLL of the held-out demonstrations' responses (`sft_nll`, the gate's metric)."""
    if not demos:
        return {"sft_nll": float("nan"), "n_demos": 0.0}
    policy.eval()
    nll_sum, n_tokens = 0.0, 0.0
    for i in range(0, len(demos), cfg.eval_batch_size):
        logp, mask = response_logprobs(policy, tokenizer, demos[i : i + cfg.eval_batch_size], cfg)
        loss, n = sft_loss(logp.float(), mask)
        nll_sum += loss.item() * n.item()
        n_tokens += n.item()
    return {"sft_nll": nll_sum / max(n_tokens, 1.0), "n_demos": float(len(demos))}
