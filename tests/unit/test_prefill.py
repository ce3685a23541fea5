"""loopserve.models.prefill: the one pass per distinct prompt that the policy service's decode loop and
the trainer's GRPO passes share (their own tests check what each computes from it end to end)."""

from __future__ import annotations

from pathlib import Path

import torch

from loopserve.models import generator
from loopserve.models.prefill import distinct_rows, prefill_rows
from tests.support import tiny_models


def test_rows_are_distinct_by_ids_and_mask_and_each_row_names_its_distinct_row() -> None:
    ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6], [0, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1]])  # row 3: token 0 is real there
    u_ids, u_mask, row_of = distinct_rows(ids, mask)
    assert len(u_ids) == 3 and row_of[0] == row_of[2] != row_of[3]
    assert torch.equal(u_ids[row_of], ids) and torch.equal(u_mask[row_of], mask)


@torch.no_grad()
def test_the_gathered_cache_and_logits_are_those_of_a_pass_over_every_row(tmp_path: Path) -> None:
    """Three rows, two of one prompt: the model sees 2 rows, and each row's next-token logits and its
    continuation on the gathered cache match a pass over all three rows."""
    model = generator.load(tiny_models.tiny_generator(tmp_path / "gen")).eval()
    ids = torch.tensor([[0, 3, 4], [5, 6, 7], [0, 3, 4]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1]])
    seen: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    u_ids, u_mask, row_of = distinct_rows(ids, mask)
    out, cache = prefill_rows(model, u_ids, u_mask, row_of)
    hook.remove()
    assert seen == [2] and cache.get_seq_length() == 3
    full = prefill_rows(model, ids, mask)[0]
    torch.testing.assert_close(out.logits[row_of], full.logits, atol=1e-5, rtol=1e-5)
    step = torch.tensor([[8], [9], [10]])
    positions = mask.sum(-1, keepdim=True)  # the next position of each left-padded row
    mask2 = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
    shared = model(input_ids=step, attention_mask=mask2, position_ids=positions, past_key_values=cache).logits
    alone = model(input_ids=torch.cat([ids, step], 1), attention_mask=mask2).logits[:, -1:]
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=1e-5)
