"""Off-policy evidence for the gate: the candidate and the serving version valued on logged traffic.

- Annotator: the logged label decisions with their propensities and the accept / reject feedback on
  them (`TrainerState.outcomes`, held-out texts only, so the candidate is never valued on items it was
  trained on). Each version is valued as the greedy policy it serves by default (its argmax label);
  DR's reward model q(x, a) is the *serving* version's calibrated probability that a is right, shared
  by both so that it favours neither.
- Generator: logged completions of the serving version, scored by the reward model, weighted by
  pi_cand(y | x) / pi_serving(y | x) (sequence probabilities at the trainer's sampling temperature).
  Only IPS and SNIPS: the reward is the reward model's own score, so DR's correction term is zero and
  DR would be the direct method, which `generation_rl.evaluate_policy` already is (fresh samples).

The formulas live in trainer/ope.py; this module only gathers their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer import causal_lm, ope
from trainer.examples import LabelOutcome, LoggedCompletion, heldout
from trainer.generation_rl import GRPOConfig

ESTIMATORS = ("ips", "snips", "dr")


def held_out_outcomes(
    outcomes: Sequence[LabelOutcome], labels: Sequence[str], fraction: float, max_items: int
) -> list[LabelOutcome]:
    """The most recent `max_items` logged outcomes on held-out texts with a label in `labels`."""
    known = set(labels)
    rows = [o for o in outcomes if o.label in known and heldout(o.text, fraction)]
    return rows[-max_items:] if max_items > 0 else rows


def annotator_estimates(
    outcomes: Sequence[LabelOutcome],
    labels: Sequence[str],
    serving_probs: torch.Tensor,
    cand_probs: torch.Tensor,
    max_weight: float = math.inf,
) -> tuple[dict[str, float], dict[str, float]]:
    """(candidate metrics, serving metrics): `ope_<estimator>` with `_lower`, `_upper`, `_ess`, and
    `ope_n`; serving_probs / cand_probs (n, L) are each version's served probabilities on the texts."""
    index = {lb: j for j, lb in enumerate(labels)}
    log = ope.LabelLog(
        actions=[index[o.label] for o in outcomes],
        propensities=[o.propensity for o in outcomes],
        rewards=[o.reward for o in outcomes],
    )
    q = serving_probs.tolist()  # (n, L): P(label a would be accepted), the shared DR reward model
    out = []
    for probs in (cand_probs, serving_probs):
        est = ope.evaluate_label_policy(log, ope.greedy(probs.tolist()), q, max_weight=max_weight)
        metrics = {"ope_n": float(len(outcomes))}
        for name in ESTIMATORS:
            metrics.update(est[name].as_metrics(f"ope_{name}"))
        out.append(metrics)
    agree = (cand_probs.argmax(-1) == serving_probs.argmax(-1)).float().mean() if len(outcomes) else torch.tensor(0.0)
    out[0]["ope_agreement"] = float(agree)
    return out[0], out[1]


def generator_estimates(
    rewards: Sequence[float],
    cand_logprobs: Sequence[float],
    serving_logprobs: Sequence[float],
    max_weight: float = math.inf,
) -> dict[str, float]:
    """IPS and SNIPS value of the candidate on logged completions y_i of the serving version:
    w_i = exp(log pi_cand(y_i|x_i) - log pi_serving(y_i|x_i)), r_i the reward model's score."""
    w = [min(math.exp(c - s), max_weight) for c, s in zip(cand_logprobs, serving_logprobs, strict=True)]
    metrics = {"ope_n": float(len(w))}
    metrics.update(ope.ips(rewards, w).as_metrics("ope_ips"))
    metrics.update(ope.snips(rewards, w).as_metrics("ope_snips"))
    return metrics


def held_out_completions(
    completions: Sequence[LoggedCompletion], version: str, fraction: float, max_items: int
) -> list[LoggedCompletion]:
    """The most recent `max_items` completions that `version` served on held-out prompts."""
    rows = [c for c in completions if c.version == version and c.response and heldout(c.prompt, fraction)]
    return rows[-max_items:] if max_items > 0 else rows


@torch.no_grad()
def completion_logprobs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, logged: Sequence[LoggedCompletion], cfg: GRPOConfig
) -> list[float]:
    """log pi(y_i | x_i) of each logged completion under `model`, at the trainer's sampling temperature,
    over the completion's tokens (no EOS appended: the logged propensity does not count one either)."""
    out: list[float] = []
    for i in range(0, len(logged), cfg.eval_batch_prompts):
        chunk = logged[i : i + cfg.eval_batch_prompts]
        p_ids, p_mask = causal_lm.encode_prompts(
            tokenizer, [c.prompt for c in chunk], cfg.max_prompt_tokens, cfg.chat_template
        )
        c_ids, c_mask = causal_lm.encode_completions(
            tokenizer, [c.response for c in chunk], cfg.max_new_tokens, add_eos=False
        )
        logp = causal_lm.completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, temperature=cfg.temperature)
        out += (logp * c_mask.to(logp.device)).sum(-1).tolist()  # (B,)
    return out
