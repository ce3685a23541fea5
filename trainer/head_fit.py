"""A linear head fitted on fixed embeddings: regularised multinomial logistic regression.

    W*, b* = argmin  1/N sum_i CE(W e_i + b, y_i)  +  lambda/2 ||W - W_0||^2

with W_0 a prior head (the zero-shot head, or the head a fine-tune trained; where the fit is cross-validated,
never a head fitted on the held-out folds' labels, which would leak them into its answers): with few labels
the fit stays near what is already known instead of swinging to whatever the last dozen items say. LBFGS
on an (N, 384) matrix takes milliseconds. Two users: the online tier (trainer.annotation_head: a new head on
the serving encoder's cached embeddings) and the end of a fine-tuning round (trainer.annotation_policy's
`head_refit`, SetFit's second stage).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_head(
    emb: torch.Tensor,
    labels: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    *,
    l2: float,
    max_iter: int,
    class_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """emb (N, C), labels (N,), prior w0 (L, C), b0 (L,) -> (W, b) of the regularised logistic regression;
    `class_weight` (L,) weighs each label's cross-entropy (the fine-tune's class balance, kept by its refit)."""
    w = w0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(emb @ w.T + b, labels, weight=class_weight) + 0.5 * l2 * (w - w0).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()
