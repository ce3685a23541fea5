"""Batched autoregressive sampling with a KV cache, per-sequence parameters and streaming.

Each row has its own temperature / top-p / top-k / seed / stop strings, so requests with different
parameters share one batch. Rows are left-padded; a finished or cancelled row stops costing anything
but its slot in the batch, and the loop ends when every row is done.

Rows that carry the same prompt (a request's n completions) share its prefill: each distinct prompt runs
once and its cache rows are gathered per row (`prefill`), as vLLM's prefix caching does for whole
prompts; the rows then decode apart, each with its own seed.

Rows are isolated: a row whose sampling fails (or whose logits are not finite: a model fault) ends
with its own `error`, and every other row of the batch decodes on. Temperature scaling cannot
overflow: logits are shifted so their maximum is 0 before dividing (in float64), so any temperature
> 0, however tiny, gives a valid distribution (the greedy limit as it goes to 0).
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from loopserve.errors import ModelFault
from loopserve.models.prefill import distinct_rows, prefill_rows
from policy_service.types import SamplingParams, TokenDelta


@dataclass
class SequenceRequest:
    prompt_ids: list[int]
    params: SamplingParams
    row_seed: int | None = None
    on_token: Callable[[TokenDelta], None] | None = None  # streaming: called from the decode thread
    cancelled: Callable[[], bool] = lambda: False


@dataclass
class SequenceResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    token_logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    error: Exception | None = None  # this row failed (the rest of its batch did not)
    # The end-of-sequence token's log-probability when the row ended on it: not a token of the text,
    # but part of the probability of *this finished sequence*, which is the logged propensity.
    stop_logprob: float = 0.0

    @property
    def sequence_logprob(self) -> float:
        return float(sum(self.token_logprobs)) + self.stop_logprob


def sampling_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(V,) raw logits -> (V,) float64 log-probabilities of the sampling distribution.

    Shifting by the maximum first keeps every scaled logit <= 0, so dividing by a tiny temperature
    gives large negative numbers (or -inf), never +inf or NaN: the top token keeps log-probability ~0.
    """
    shifted = logits.double() - logits.max().double()  # (V,), max 0
    scaled = _filter_logits(shifted / params.temperature, params.top_k, params.top_p)
    return torch.log_softmax(scaled, dim=-1)


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(V,) -> (V,) with the tokens outside top-k / the top-p nucleus set to -inf."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class Row:
    """Book-keeping for one sequence: text so far, stop strings, what has been streamed."""

    def __init__(self, req: SequenceRequest, tokenizer: PreTrainedTokenizerBase) -> None:
        self.req = req
        self.tok = tokenizer
        self.result = SequenceResult()
        self.done = False
        seed = req.row_seed if req.row_seed is not None else secrets.randbits(63)
        # On the CPU whatever the model's device: one uniform per token, drawn without a GPU sync.
        self.gen = torch.Generator().manual_seed(seed)
        self.streamed = 0
        self.holdback = max((len(s) for s in req.params.stop), default=1) - 1

    def push(self, token_id: int, logprob: float, eos_ids: set[int]) -> None:
        p = self.req.params
        r = self.result
        if token_id in eos_ids:
            r.stop_logprob = logprob
            self.finish("stop")
            return
        r.token_ids.append(token_id)
        r.token_logprobs.append(logprob)
        text = str(self.tok.decode(r.token_ids, skip_special_tokens=True))
        for s in p.stop:
            cut = text.find(s)
            if cut != -1:
                r.text = text[:cut]
                self.finish("stop")
                return
        r.text = text
        if len(r.token_ids) >= p.max_new_tokens:
            self.finish("length")
            return
        self._stream(logprob, final=False)

    def _stream(self, logprob: float, final: bool) -> None:
        if self.req.on_token is None:
            return
        text = self.result.text
        # Hold back what could still turn into a stop string, and a half-decoded character.
        safe = len(text) if final else max(self.streamed, len(text) - self.holdback)
        if not final and text[self.streamed : safe].endswith("\ufffd"):
            safe = self.streamed
        delta = text[self.streamed : safe]
        self.streamed = max(self.streamed, safe)
        if final:
            self.req.on_token(
                TokenDelta(
                    text=delta,
                    logprob=logprob,
                    done=True,
                    finish_reason=self.result.finish_reason,
                    num_tokens=len(self.result.token_ids),
                )
            )
        elif delta or logprob:
            self.req.on_token(TokenDelta(text=delta, logprob=logprob, num_tokens=len(self.result.token_ids)))

    def fail(self, error: Exception) -> None:
        """End this row alone with `error` (streaming callers learn it from the batch result)."""
        self.done = True
        self.result.finish_reason = "error"
        self.result.error = error

    def finish(self, reason: str) -> None:
        self.done = True
        self.result.finish_reason = reason
        self._stream(0.0, final=True)


def sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]
) -> tuple[list[int], list[float]]:
    """(b, V) raw logits of b rows -> each row's token and its log-probability under that row's sampling
    distribution (the raw distribution for a greedy row), in one pass over the batch.

    The numbers are `sampling_logprobs` row by row, computed for all rows at once (each row its own
    temperature, top-k and top-p); the draw is inverse-CDF from one uniform per row taken from the row's
    own CPU generator, so a seed reproduces a row's completion whatever shares its batch, and a GPU
    batch costs one kernel per operation, not one per row.
    """
    b, V = logits.shape
    device = logits.device
    tokens = torch.zeros(b, dtype=torch.long, device=device)
    logps = torch.zeros(b, dtype=torch.float64, device=device)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    sampled = [i for i, p in enumerate(params) if p.temperature != 0]
    if greedy:
        g = torch.tensor(greedy, device=device)
        logp = torch.log_softmax(logits[g].float(), dim=-1)  # (g, V)
        tok = logp.argmax(-1)
        tokens[g] = tok
        logps[g] = logp.gather(-1, tok[:, None])[:, 0].double()
    if sampled:
        s = torch.tensor(sampled, device=device)
        rows = logits[s].double()  # (s, V)
        temps = torch.tensor([params[i].temperature for i in sampled], dtype=torch.float64, device=device)
        # Shift so the maximum is 0 before dividing: a tiny temperature gives -inf, never +inf or NaN.
        scaled = (rows - rows.max(-1, keepdim=True).values) / temps[:, None]
        ks = torch.tensor([params[i].top_k for i in sampled], device=device)
        cut_k = (ks > 0) & (ks < V)
        if any(0 < params[i].top_k < V for i in sampled):  # (decided on the host: no device sync)
            kth = scaled.sort(-1, descending=True).values.gather(-1, (ks.clamp(1, V) - 1)[:, None])  # (s, 1)
            scaled = scaled.masked_fill((scaled < kth) & cut_k[:, None], float("-inf"))
        ps = torch.tensor([params[i].top_p for i in sampled], dtype=torch.float64, device=device)
        cut_p = ps < 1.0
        if any(params[i].top_p < 1.0 for i in sampled):
            sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # Drop a token when the mass before it already reaches top_p (the first token always stays).
            drop_sorted = ((probs.cumsum(-1) - probs) >= ps[:, None]) & cut_p[:, None]
            scaled = scaled.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
        logp = torch.log_softmax(scaled, dim=-1)  # (s, V): each row's sampling distribution
        cdf = logp.exp().cumsum(-1)
        # u in (0, 1): a token of probability 0 can never be the first whose cumulative mass reaches u.
        u = torch.tensor(
            [max(float(torch.rand((), generator=gens[i], dtype=torch.float64)), 1e-300) for i in sampled],
            dtype=torch.float64,
            device=device,
        )
        tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None])[:, 0].clamp(max=V - 1)
        tokens[s] = tok
        logps[s] = logp.gather(-1, tok[:, None])[:, 0]
    return tokens.tolist(), logps.tolist()


def _sample(logits: torch.Tensor, row: Row) -> tuple[int, float]:
    """(V,) logits -> (token id, its log-probability under the sampling distribution): one row alone."""
    tokens, logps = sample_rows(logits[None], [row.req.params], [row.gen])
    return tokens[0], logps[0]


def eos_ids_of(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that end a sequence: the tokenizer's EOS and the generation config's."""
    eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(gen_eos, int):
        eos_ids.add(gen_eos)
    elif isinstance(gen_eos, list):
        eos_ids.update(gen_eos)
    return eos_ids


def advance(rows: list[Row], logits: torch.Tensor, eos_ids: set[int], next_ids: torch.Tensor) -> None:
    """One token for every live row: (B, V) last-position logits -> next_ids[i] and each row's state.

    A cancelled row ends "cancelled"; a row whose logits are not finite ends with a ModelFault; a row
    whose sampling (or streaming callback) raises ends with that error. The other rows decode on.
    """
    logits = logits.float()
    # A NaN or +inf logit, or a row with no finite logit, is the model's fault (a broken weight).
    broken = (torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | torch.isneginf(logits).all(-1)).tolist()
    live: list[int] = []
    for i, row in enumerate(rows):
        if row.done:
            continue
        if row.req.cancelled():
            row.done = True
            row.result.finish_reason = "cancelled"
        elif broken[i]:
            row.fail(ModelFault("the generator produced non-finite logits; the server logged the incident"))
        else:
            live.append(i)
    if not live:
        return
    try:
        idx = torch.tensor(live, device=logits.device)
        drawn = sample_rows(logits[idx], [rows[i].req.params for i in live], [rows[i].gen for i in live])
        picks: list[tuple[int, float] | Exception] = list(zip(*drawn, strict=True))
    except Exception:  # some row's sampling failed: each alone, so only that row ends with its error
        picks = []
        for i in live:
            try:
                picks.append(_sample(logits[i], rows[i]))
            except Exception as exc:
                picks.append(exc)
    for i, pick in zip(live, picks, strict=True):
        row = rows[i]
        if isinstance(pick, Exception):
            row.fail(pick)
            continue
        tok, logprob = pick
        next_ids[i] = tok
        try:
            row.push(tok, logprob, eos_ids)
        except Exception as exc:  # its streaming callback's fault: the batch decodes on
            row.fail(exc)


def left_padded(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (B, T) input ids and attention mask, padded on the left so every row ends at T."""
    T = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, T - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, T - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def last_logits_only(model: PreTrainedModel) -> dict[str, int]:
    """The forward's keyword that projects only the last position onto the vocabulary (the only logits
    sampled), where the model takes it (most of transformers' causal LMs do). A prefill of 8 prompts of
    1,000 tokens then skips 8,000 x 49,152 logits of SmolLM2 (about 0.8 GB in bf16), and 10% of its time
    on a CPU."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def prefill(
    model: PreTrainedModel, prompts: list[list[int]], pad_id: int, device: torch.device, last_only: dict[str, int]
) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
    """Each distinct prompt through the model once (`loopserve.models.prefill`): per row, the logits of
    its next token (B, V), the KV cache and the attention mask (B, T). A request for n completions
    prefills its prompt once, not n times. `last_only`: `last_logits_only(model)`, which the caller reads
    once (it inspects the forward's signature)."""
    ids, mask = left_padded(prompts, pad_id, device)
    distinct_ids, distinct_mask, row_of = distinct_rows(ids, mask)
    out, cache = prefill_rows(model, distinct_ids, distinct_mask, row_of, **last_only)
    return out.logits[row_of, -1, :], cache, mask


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[SequenceRequest],
) -> list[SequenceResult]:
    """Static batching: every row starts together and the batch runs until its last row ends (the
    baseline the continuous decode batch in `continuous.py` is measured against; the trainer's path)."""
    device = next(model.parameters()).device
    rows = [Row(r, tokenizer) for r in requests]
    B = len(rows)
    pad_id = pad_id_of(tokenizer)
    eos_ids = eos_ids_of(model, tokenizer)
    last_only = last_logits_only(model)
    logits, past, attention_mask = prefill(model, [r.prompt_ids for r in requests], pad_id, device, last_only)
    cur_pos = (attention_mask.sum(-1, keepdim=True) - 1).clamp(min=0)  # (B, 1): the last prompt token's position
    max_steps = max(r.params.max_new_tokens for r in requests)
    for step in range(max_steps):
        next_ids = torch.full((B,), pad_id, dtype=torch.long, device=device)
        advance(rows, logits, eos_ids, next_ids)
        if all(r.done for r in rows) or step == max_steps - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones((B, 1), dtype=attention_mask.dtype, device=device)], -1)
        cur_pos = cur_pos + 1  # (B, 1)
        out = model(
            input_ids=next_ids.unsqueeze(-1),  # (B, 1)
            attention_mask=attention_mask,
            position_ids=cur_pos,
            past_key_values=past,
            use_cache=True,
            **last_only,
        )
        past = out.past_key_values
        logits = out.logits[:, -1, :]
    for row in rows:
        if not row.done:  # ran out of steps in a mixed batch (cannot happen: each row caps itself)
            row.finish("length")
    return [r.result for r in rows]
