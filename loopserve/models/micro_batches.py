"""Encoder forwards over texts of mixed lengths: sorted by length, cut where padding would cost.

A batch pads every sequence to its longest. On a CPU a forward's cost grows with every token it carries,
padding included, so 32 Fine Food reviews (median 70 tokens, the longest 256) in one forward are mostly
padding. Sorted and cut into forwards of at most 512 padded tokens each, the annotator runtime answers
them at 2.1x the items/s of one forward (bf16 150 against 71; fp32 63 against 25) and the reward runtime
scores them at 2.2x (bf16 137 against 62), batches of 8 at 1.5-1.7x (bench/results/padding.json, 2-core
AMD EPYC, in process). The trainer's embedding passes (`trainer.annotation_policy.embed_texts`: the gate's
evaluations, calibration, head refits, pseudo-labelling) cut theirs alike: 1,000 Fine Food train reviews in
bf16 embed 1.8x as fast at 128 tokens (274 against 151 a second) and 3.3x at 256 (220 against 66), every
embedding within cosine 0.99997 of the unsorted pass's. On a GPU the sequences of a forward run in parallel,
so there the rule stays one forward of up to 32 (the trainer's: its batch size), whatever their lengths.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

MAX_ITEMS = 32
"""Sequences per forward, at most."""
CPU_TOKEN_BUDGET = 512
"""Padded tokens per forward on a CPU (what `--encoder-token-budget` 0 means there). In the same run, batches
of 32 at 256 / 512 / 1,024 / 2,048: the annotator in bf16 185 / 150 / 142 / 130 items/s, the reward model
122 / 137 / 127 / 119; 512 is the middle of a flat optimum on both."""


NO_TOKEN_LIMIT = -1
"""A budget that cuts by sequences only (one forward of up to MAX_ITEMS, however long): `--encoder-token-budget
-1`, and the GPU's rule."""


def token_budget(configured: int, device_type: str) -> int:
    """`--encoder-token-budget` as micro_batches takes it: 0 means CPU_TOKEN_BUDGET on a CPU and NO_TOKEN_LIMIT
    elsewhere; any other value is itself. Never 0, so resolving twice changes nothing."""
    if configured != 0:
        return configured
    return CPU_TOKEN_BUDGET if device_type == "cpu" else NO_TOKEN_LIMIT


def micro_batches(lengths: Sequence[int], budget: int, max_items: int = MAX_ITEMS) -> list[list[int]]:
    """Indices into `lengths`, shortest first, cut into forwards of at most `max_items` whose padded size
    (count x longest) stays within `budget` tokens (0 or below: no token limit). A sequence longer than the budget
    gets a forward of its own."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    for i in order:  # ascending, so the newest member is the longest: padded size = count x its length
        last = out[-1] if out else None
        if last is None or len(last) >= max_items or (budget > 0 and (len(last) + 1) * lengths[i] > budget):
            out.append([i])
        else:
            last.append(i)
    return out


def padded_groups(
    tokenizer: Any, enc: Mapping[str, Sequence[Sequence[int]]], budget: int, max_items: int = MAX_ITEMS
) -> Iterator[tuple[list[int], Any]]:
    """The micro_batches of unpadded encodings `enc` (`input_ids` and any other per-token fields of the same
    lengths), each as (its indices into `enc`, its rows padded by `tokenizer` into tensors with an
    attention mask): the one loop of every encoder pass (both runtimes, the trainer's embeddings)."""
    for idx in micro_batches([len(x) for x in enc["input_ids"]], budget, max_items):
        yield idx, tokenizer.pad({k: [v[i] for i in idx] for k, v in enc.items()}, return_tensors="pt")
