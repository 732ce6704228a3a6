"""Global allocation: which components (or modules) get the budget."""
from __future__ import annotations

import torch


def threshold_masks(scores: list[torch.Tensor], budget: int) -> list[torch.Tensor]:
    """Keep the ``budget`` best components over all matrices together.

    ``scores``: one 1-D tensor of component scores per matrix. Returns boolean keep-masks of the same shapes:
    ``S > kthvalue(all S, k = n - budget)`` as in AdaLoRA (ties at the threshold are dropped), everything when
    ``budget >= n``, nothing when ``budget <= 0``.
    """
    flat = torch.cat([s.reshape(-1) for s in scores]) if scores else torch.zeros(0)
    n = flat.numel()
    if budget >= n:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    if budget <= 0:
        return [torch.zeros_like(s, dtype=torch.bool) for s in scores]
    thr = torch.kthvalue(flat.float(), n - budget).values
    return [s > thr for s in scores]


def top_modules(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest module scores (ties broken by index, so every rank picks the same)."""
    k = max(0, min(k, scores.numel()))
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return order[:k]
