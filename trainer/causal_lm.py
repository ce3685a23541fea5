"""Causal-LM pieces that GRPO and DPO share: prompt formatting, the prompt + completion token layout,
per-token log-probabilities of completion tokens, and sampling.

Layout of every batch (so log-probs of sampled and of logged completions are computed the same way):

    [pad ... pad | prompt tokens | completion tokens | pad ... pad]
     left-padded prompt (B, P)     right-padded completion (B, C)

Position ids come from the attention mask (cumsum - 1), so padding moves nothing; the logits at
positions P-1 .. P+C-2 predict the C completion tokens, and only those are computed (`logits_to_keep`).

Rows that share a prompt (a rollout's k samples of each prompt; a DPO pair) share its forward pass: the
distinct prompts run once, and their key/value cache is gathered to every row before the completions run
(`completion_forward`, and `sample`'s prefill). A prompt with the chat template's system turn is most of
a short rollout's tokens, so this is about a third of a GRPO step on a CPU; the result is the full pass's
up to float rounding, gradients included (with dropout on, the rows of a prompt share its dropout mask).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from loopserve.models.generator import prompt_text
from loopserve.models.prefill import distinct_rows, prefill_rows


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_tokens: int, chat_template: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask, (B, P); over-long prompts keep their last `max_tokens` tokens."""
    texts = [prompt_text(tokenizer, p, chat_template) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][-max_tokens:] for t in texts]
    return _pad(ids, tokenizer.pad_token_id, left=True)


def encode_completions(
    tokenizer: PreTrainedTokenizerBase, completions: Sequence[str], max_tokens: int, add_eos: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded completion ids and mask, (B, C); EOS appended (a served completion ended there)."""
    ids = []
    for c in completions:
        toks = tokenizer(c, add_special_tokens=False)["input_ids"][:max_tokens]
        if add_eos and tokenizer.eos_token_id is not None and len(toks) < max_tokens:
            toks = [*toks, tokenizer.eos_token_id]
        ids.append(toks or [tokenizer.eos_token_id])
    return _pad(ids, tokenizer.pad_token_id, left=False)


def _pad(ids: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    out = torch.full((len(ids), width), pad_id, dtype=torch.long)  # (B, W)
    mask = torch.zeros((len(ids), width), dtype=torch.long)  # (B, W)
    for i, x in enumerate(ids):
        if not x:
            continue
        sl = slice(width - len(x), width) if left else slice(0, len(x))
        out[i, sl] = torch.tensor(x, dtype=torch.long)
        mask[i, sl] = 1
    return out, mask


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[index] without materialising the whole (B, C, V) log-softmax:
    logits (B, C, V), index (B, C) -> (B, C). Row by row to bound peak memory (V is ~49k)."""
    rows = []
    for row_logits, row_index in zip(logits, index, strict=True):  # (C, V), (C,)
        picked = row_logits.gather(-1, row_index[:, None]).squeeze(-1)  # (C,)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def completion_forward(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    hidden: bool = False,
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits that predict each completion token, (B, C, V), and with `hidden` the last hidden state
    at the same positions (the state before each token), (B, C, H).

    Two passes: the distinct prompt rows with a cache, then every row's completion (all but its last
    token, which predicts nothing) on that cache gathered per row. Autograd runs through the gather, so
    the gradient of a shared prompt sums over the rows that share it, as in one full pass. Where every
    prompt row is distinct there is nothing to share, and the one full pass runs. `share_prompts=False`
    runs the one full pass always (every row's prompt and completion, no cache): the layout's plain
    definition, which the benchmark and the tests measure the shared passes against."""
    device = next(model.parameters()).device
    p = prompt_ids.shape[1]
    distinct_ids, distinct_mask, row_of = distinct_rows(prompt_ids, prompt_mask)
    if not share_prompts or len(distinct_ids) == len(prompt_ids):  # nothing shared: one pass costs less
        return _one_pass(model, prompt_ids, prompt_mask, completion_ids, completion_mask, hidden)
    row_of = row_of.to(device)
    out, cache = prefill_rows(  # U rows; the cache gathered to B
        model, distinct_ids, distinct_mask, row_of, logits_to_keep=1, output_hidden_states=hidden
    )
    logits = [out.logits[row_of][:, -1:]]  # (B, 1, V): the prompt's last position predicts completion token 0
    states = [out.hidden_states[-1][row_of, -1:]] if hidden else []  # (B, 1, H)
    if completion_ids.shape[1] > 1:
        attention_mask = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1).to(device)  # (B, P + C - 1)
        rest = model(
            input_ids=completion_ids[:, :-1].to(device),
            attention_mask=attention_mask,
            position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0)[:, p:],
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=hidden,
        )
        logits.append(rest.logits)  # (B, C - 1, V)
        states += [rest.hidden_states[-1]] if hidden else []
    return torch.cat(logits, dim=1), torch.cat(states, dim=1) if hidden else None


def _one_pass(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    device = next(model.parameters()).device
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).to(device)  # (B, P + C)
    c = completion_ids.shape[1]
    out = model(
        input_ids=torch.cat([prompt_ids, completion_ids], dim=1).to(device),  # (B, P + C)
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
        logits_to_keep=c + 1,
        output_hidden_states=hidden,
        use_cache=False,
    )
    states = out.hidden_states[-1][:, -(c + 1) : -1] if hidden else None  # (B, C, H)
    return out.logits[:, :-1], states  # (B, C, V): position t predicts token t + 1


def completion_logprobs(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    share_prompts: bool = True,
) -> torch.Tensor:
    """Per-token log pi(y_t | x, y_<t) of the completion tokens: (B, C) (garbage where mask is 0).

    `temperature` divides the logits as sampling did, so the log-probs are those of the distribution
    the completions were drawn from. `share_prompts`: as `completion_forward`'s."""
    args = (prompt_ids, prompt_mask, completion_ids, completion_mask)
    logits, _ = completion_forward(model, *args, share_prompts=share_prompts)
    return selective_log_softmax(logits.float() / temperature, completion_ids.to(logits.device))  # (B, C)


def sequence_logprobs(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """log pi(y | x) summed over completion tokens only: (B,)."""
    logp = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)  # (B, C)
    return (logp * completion_mask.to(logp.device)).sum(-1)


@dataclass
class Rollout:
    """Sampled completions: row i * k + j is the j-th sample for prompt i."""

    prompt_ids: torch.Tensor  # (B, P), each prompt repeated k times
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, C)
    completion_mask: torch.Tensor  # (B, C): 1 up to and including the first EOS
    texts: list[str]  # B decoded completions, special tokens dropped


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    k: int,
    *,
    max_new_tokens: int,
    max_prompt_tokens: int,
    temperature: float = 1.0,
    chat_template: bool = True,
    share_prefill: bool = True,
) -> Rollout:
    """k completions per prompt, drawn from pi itself (no top-k / top-p truncation, so the log-probs
    of `completion_logprobs` are those of the sampling distribution, as the policy gradient needs).
    Uses the global torch RNG: fork and seed it around the call for reproducible draws. The k samples of
    a prompt share its prefill (`share_prefill=False`: each row prefills its own copy; the same draws up
    to float rounding)."""
    model.eval()
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, max_prompt_tokens, chat_template)
    prefix = _prefill(model, prompt_ids[:, :-1], prompt_mask[:, :-1], k) if share_prefill else None
    prompt_ids = prompt_ids.repeat_interleave(k, dim=0)  # (B, P), B = len(prompts) * k
    prompt_mask = prompt_mask.repeat_interleave(k, dim=0)
    out = model.generate(  # type: ignore[operator]
        input_ids=prompt_ids.to(device),
        attention_mask=prompt_mask.to(device),
        past_key_values=prefix,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ).cpu()
    completion_ids = out[:, prompt_ids.shape[1] :]  # (B, C)
    is_eos = completion_ids == tokenizer.eos_token_id  # (B, C)
    # Keep tokens up to and including the first EOS; what generate appended after it is padding.
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # (B, C)
    completion_mask = (~after_eos).long()
    texts = [
        str(tokenizer.decode(ids[m.bool()], skip_special_tokens=True))
        for ids, m in zip(completion_ids, completion_mask, strict=True)
    ]
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, texts)


@torch.no_grad()
def _prefill(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, k: int) -> DynamicCache | None:
    """The cache of each prompt but its last token, computed once and repeated for its k samples; generate
    then runs only the last prompt token before decoding. None when there is nothing to share."""
    if k < 2 or ids.shape[1] == 0 or getattr(model.generation_config, "cache_implementation", None):
        return None  # a model set to build its own kind of cache (static, quantised) is left to build it
    _, cache = prefill_rows(model, ids, mask, logits_to_keep=1)
    cache.batch_repeat_interleave(k)
    return cache


def precision_dtype(precision: str, device: torch.device) -> torch.dtype:
    """ "auto" (bf16 on CUDA, fp32 on CPU), "fp32" or "bf16". Not the services' rule, which also picks bf16
    on a CPU with native bf16 (`loopserve.device.pick_dtype`): the generator's objectives (PPO, GRPO, SFT)
    were measured in fp32 on CPUs, and their bf16 path (a bf16 rollout copy, autocast) on CUDA only."""
    from loopserve.device import pick_dtype

    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return pick_dtype({"fp32": "float32", "bf16": "bfloat16"}.get(precision, precision), device)


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Mixed precision for forward passes when `dtype` is below fp32 (the weights and their gradients
    stay fp32, so the optimizer's updates do not lose small steps); a no-op in fp32."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


class Sampler:
    """A low-precision copy of a policy to sample rollouts from, refreshed from the policy each step.

    Sampling is most of a GRPO step and runs with no gradient, so it need not run on the fp32 training
    weights: decoding with bf16 weights is ~1.6x faster on this CPU (and the norm on GPUs, as TRL's
    vLLM generation is). Casting weights inside autocast on every decoded token would cost more than it
    saves, hence a persistent copy. The log-probs the loss uses are still taken from the training
    weights, so the small bf16 rounding only makes the samples very slightly off-policy.

    `sync` copies the policy's effective weights: every trainable parameter, and for each LoRA-wrapped
    layer its frozen base weight plus the adapter's current delta (never mutating the policy)."""

    def __init__(self, policy: PreTrainedModel, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.shares_policy = dtype == torch.float32
        if self.shares_policy:
            self.model = policy  # fp32: sample from the policy itself, nothing to copy
            return
        plain: torch.nn.Module = merge_lora(copy.deepcopy(policy))
        self.model = plain.to(dtype).eval().requires_grad_(False)  # type: ignore[assignment]
        self.params = dict(self.model.named_parameters())

    @staticmethod
    def _plain_name(name: str) -> str:
        """A peft parameter/module name as it is in the plain model."""
        return name.removeprefix("base_model.model.").replace(".base_layer", "")

    @torch.no_grad()
    def sync(self, policy: PreTrainedModel) -> None:
        if self.shares_policy:
            return
        for name, module in policy.named_modules():
            delta = getattr(module, "get_delta_weight", None)
            if delta is not None and hasattr(module, "base_layer"):  # a peft LoRA layer
                w = module.base_layer.weight + sum(delta(a) for a in module.active_adapters)
                self.params[self._plain_name(name) + ".weight"].copy_(w)
        for name, p in policy.named_parameters():
            if p.requires_grad and "lora_" not in name:
                self.params[self._plain_name(name)].copy_(p)


@dataclass
class LoraSettings:
    r: int = 0
    """LoRA rank; 0 means full fine-tuning (every weight trains)."""
    alpha: int = 16
    """LoRA scaling numerator (the update is B A * alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    """Modules that get adapters (Hu et al., 2021 adapt the attention query and value projections)."""


def add_lora(model: PreTrainedModel, lora: LoraSettings) -> PreTrainedModel:
    """Wrap `model` with trainable LoRA adapters (the base weights freeze); a no-op when lora.r == 0."""
    if lora.r <= 0:
        return model
    from peft import LoraConfig, get_peft_model  # only when LoRA is asked for

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)  # type: ignore[return-value]


def merge_lora(model: PreTrainedModel) -> PreTrainedModel:
    """Fold adapters into the base weights so the published version is a plain model."""
    merge = getattr(model, "merge_and_unload", None)
    return merge() if merge is not None else model
