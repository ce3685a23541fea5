"""A decode batch that requests join and leave at token boundaries (continuous batching).

Static batching (`sampling.generate`) starts every row together and runs until the last one ends, so a
4-token request sent while long ones decode waits for the whole batch. Here the batch lives on: each
`step()` decodes one token for every live row, `admit()` prefills new requests and merges their KV
cache into the running one, and a row that ends leaves at once (its cache rows are dropped). This is
how vLLM and TGI schedule, on transformers' DynamicCache; the sampling itself (per-row temperature,
top-p, top-k, seed, stop strings, logprobs, cancellation, model-fault isolation) is `sampling.advance`,
the same code as the static path.

Why not transformers' own continuous batching (`model.generate_batch`, `init_continuous_batching`):
it samples with one generator for the whole batch, so a request's seed would not reproduce its
completion, and it reports log-probabilities of the raw distribution, not of the sampling distribution
the logged propensity must be; it needs a paged-attention kernel as well. Per-row seeds and exact
propensities are part of loopserve's contract (DESIGN.md), so rows are sampled here.

Layout: rows are left-padded, so every row's newest token sits in the last column. Joining pads the
shorter of the running cache and the newcomers' cache on the left; leaving drops rows and then the
leading columns that are padding in every remaining row, so the cache is as long as the longest live
row, not the longest row ever seen.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from policy_service import sampling

Token = Hashable  # the caller's handle for one job (a group of rows finished together)


@dataclass
class _Job:
    token: Token
    rows: list[sampling.Row]


class DecodeBatch:
    """One model version's running batch. Not thread-safe: one decode thread owns it."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.pad_id = sampling.pad_id_of(tokenizer)
        self.eos_ids = sampling.eos_ids_of(model, tokenizer)
        self._jobs: list[_Job] = []
        self._rows: list[sampling.Row] = []  # batch order: row i is cache row i
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # (B, T)
        self._next = torch.zeros((0,), dtype=torch.long, device=self.device)  # (B,) token to feed next
        self._pos = torch.zeros((0,), dtype=torch.long, device=self.device)  # (B,) its position
        self._last_only = sampling.last_logits_only(model)

    @property
    def rows(self) -> int:
        return len(self._rows)

    @torch.inference_mode()
    def admit(self, jobs: list[tuple[Token, list[sampling.SequenceRequest]]]) -> None:
        """Prefill the jobs' prompts together, sample each new row's first token, join the batch."""
        new_jobs = [_Job(t, [sampling.Row(r, self.tokenizer) for r in reqs]) for t, reqs in jobs]
        rows = [r for j in new_jobs for r in j.rows]
        if not rows:
            return
        prompts = [r.req.prompt_ids for r in rows]
        logits, cache, mask = sampling.prefill(self.model, prompts, self.pad_id, self.device, self._last_only)
        next_ids = torch.full((len(rows),), self.pad_id, dtype=torch.long, device=self.device)
        sampling.advance(rows, logits, self.eos_ids, next_ids)
        self._join(cache, mask, next_ids, mask.sum(-1), rows)
        self._jobs.extend(new_jobs)
        self._drop_done()

    @torch.inference_mode()
    def step(self) -> None:
        """One token for every live row."""
        if not self._rows:
            return
        B = len(self._rows)
        self._mask = torch.cat([self._mask, torch.ones((B, 1), dtype=torch.long, device=self.device)], -1)
        out = self.model(
            input_ids=self._next.unsqueeze(-1),  # (B, 1)
            attention_mask=self._mask,
            position_ids=self._pos.unsqueeze(-1),  # (B, 1)
            past_key_values=self._cache,
            use_cache=True,
        )
        self._cache = out.past_key_values
        next_ids = torch.full((B,), self.pad_id, dtype=torch.long, device=self.device)
        sampling.advance(self._rows, out.logits[:, -1, :], self.eos_ids, next_ids)
        self._next = next_ids
        self._pos = self._pos + 1
        self._drop_done()

    def fail_all(self, error: Exception) -> None:
        """The batch as a whole broke (a forward raised): every live row ends with `error`."""
        for row in self._rows:
            if not row.done:
                row.fail(error)
        self._drop_done()

    def pop_finished(self) -> list[tuple[Token, list[sampling.SequenceResult]]]:
        """Jobs whose every row has ended, with their rows' results in request order."""
        done = [j for j in self._jobs if all(r.done for r in j.rows)]
        if done:
            self._jobs = [j for j in self._jobs if not all(r.done for r in j.rows)]
        return [(j.token, [r.result for r in j.rows]) for j in done]

    # ---- the cache ----------------------------------------------------------------------------

    def _join(
        self,
        cache: DynamicCache,
        mask: torch.Tensor,
        next_ids: torch.Tensor,
        pos: torch.Tensor,
        rows: list[sampling.Row],
    ) -> None:
        if self._cache is None or not self._rows:
            self._cache, self._mask, self._next, self._pos, self._rows = cache, mask, next_ids, pos, rows
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        # (B, H, T, D) per layer: pad T on the left to the common width, then stack the rows.
        mine = [
            (F.pad(k, (0, 0, width - old_len, 0)), F.pad(v, (0, 0, width - old_len, 0))) for k, v in _kv(self._cache)
        ]
        theirs = [(F.pad(k, (0, 0, width - new_len, 0)), F.pad(v, (0, 0, width - new_len, 0))) for k, v in _kv(cache)]
        _set_kv(
            self._cache,
            [(torch.cat([a, c], 0), torch.cat([b, d], 0)) for (a, b), (c, d) in zip(mine, theirs, strict=True)],
        )
        self._mask = torch.cat([F.pad(self._mask, (width - old_len, 0)), F.pad(mask, (width - new_len, 0))], 0)
        self._next = torch.cat([self._next, next_ids])
        self._pos = torch.cat([self._pos, pos])
        self._rows = self._rows + rows

    def _drop_done(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if not r.done]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = None
            self._mask = self._mask[:0, :0]
            self._next, self._pos = self._next[:0], self._pos[:0]
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._mask, self._next, self._pos = self._mask[idx], self._next[idx], self._pos[idx]
        # Columns that are padding in every remaining row cost attention and memory: cut them.
        live_cols = self._mask.any(0).nonzero()
        first = int(live_cols[0]) if live_cols.numel() else 0
        self._mask = self._mask[:, first:]
        assert self._cache is not None
        _set_kv(self._cache, [(k[idx, :, first:], v[idx, :, first:]) for k, v in _kv(self._cache)])


def _kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values), (B, H, T, D) each."""
    out = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer or layer.keys is None or layer.values is None:
            # Sliding-window or quantised layers keep state beyond keys/values; rows cannot be moved.
            raise TypeError("continuous batching needs a plain dynamic KV cache (no sliding window)")
        out.append((layer.keys, layer.values))
    return out


def _set_kv(cache: DynamicCache, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for layer, (keys, values) in zip(cache.layers, kv, strict=True):
        assert isinstance(layer, DynamicLayer)  # checked by _kv
        layer.keys, layer.values = keys, values


__all__ = ["DecodeBatch", "Token"]
