"""Each distinct prompt through a causal LM once, its KV cache then gathered for every row that shares it.

Both the policy service (a request for n completions, `policy_service.sampling.prefill`) and the trainer
(a GRPO group of k samples of one prompt, `trainer.causal_lm.completion_forward`; the k draws of
`sample`) hand a batch to the model in which many rows carry the same prompt. The prompt's pass is the
costly part of a short completion, so they run it once per distinct prompt and gather the cache (and,
as each needs, the logits or hidden states) per row: in the trainer autograd runs through the gather,
so the gradient of a shared prompt sums over its rows as in one pass over all of them.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel


def distinct_rows(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct rows of a padded batch, (U, T) ids and mask, and per row of the batch the index of
    its distinct row, (B,). Rows are equal when both their ids and their mask are (a pad id may also be
    a real token)."""
    both, row_of = torch.unique(torch.cat([ids, mask], dim=1), dim=0, return_inverse=True)
    t = ids.shape[1]
    return both[:, :t], both[:, t:], row_of


def prefill_rows(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, row_of: torch.Tensor | None = None, **forward: Any
) -> tuple[Any, DynamicCache]:
    """Left-padded prompt rows, (U, T), through `model` once, filling a fresh cache; with `row_of` the
    cache is then gathered to (B, ...) rows (`row_of[i]`: the row of `ids` that row i shares). Returns
    the model's output (U rows: gather what you read from it with `row_of` too) and the cache.
    `forward`: extra keywords of the model's forward (`logits_to_keep`, `output_hidden_states`)."""
    device = next(model.parameters()).device
    mask = mask.to(device)
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),  # left padding: each row counts from its first token
        past_key_values=cache,
        use_cache=True,
        **forward,
    )
    if row_of is not None and not torch.equal(row_of, torch.arange(len(row_of), device=row_of.device)):
        cache.batch_select_indices(row_of.to(device))  # (a batch of distinct rows in order keeps its cache)
    return out, cache
