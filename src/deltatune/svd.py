"""Truncated SVD helpers shared by export, combination and interference analysis (pure tensor functions).

For singular values ``S`` (descending) of an update ``dW``, keeping the top ``k`` components leaves the relative
Frobenius error ``sqrt(sum_{i >= k} S_i^2 / sum_i S_i^2)`` (Eckart-Young), and the fewest components holding a
share ``energy`` of ``||dW||_F^2`` is the first ``k`` with ``sum_{i < k} S_i^2 >= energy * sum_i S_i^2``.
"""
from __future__ import annotations

import math

import torch

from .checks import export_rank_energy


def energy_rank(S: torch.Tensor, energy: float) -> int:
    """The fewest leading components of ``S`` that hold ``energy`` of the squared norm (0 when ``S`` is all zero)."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    cum = torch.cumsum(S.double() ** 2, 0)
    return min(int(torch.searchsorted(cum, energy * cum[-1]).item()) + 1, S.numel())


def tail_error(S: torch.Tensor, k: int) -> float:
    """Relative Frobenius error of keeping the top ``k`` of singular values ``S``."""
    total = float(S.pow(2).sum())
    return math.sqrt(float(S[k:].pow(2).sum()) / total) if total > 0 else 0.0


def keep_count(S: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """``rank``, or the :func:`energy_rank` for ``energy``, or (both given) the smaller of the two; capped at
    ``len(S)``, at least 1. A ``rank`` that is not a positive integer or an ``energy`` outside ``(0, 1]`` is refused
    (never silently turned into rank 1)."""
    export_rank_energy(rank, energy)
    k = min(rank if rank is not None else S.numel(), energy_rank(S, energy) if energy is not None else S.numel())
    return max(1, min(k, S.numel()))


def svd_factors(dW: torch.Tensor, rank: int | None = None, energy: float | None = None):
    """``(B, A, error)``: the best approximation ``B A`` of ``dW`` with ``rank`` components (or the fewest holding
    ``energy``) and its relative Frobenius error."""
    U, S, Vh = torch.linalg.svd(dW.detach().float(), full_matrices=False)
    k = keep_count(S, rank, energy)
    return (U[:, :k] * S[:k]).contiguous(), Vh[:k].contiguous(), tail_error(S, k)


def factored_svd(B: torch.Tensor, A: torch.Tensor):
    """``(U, S, V)`` with ``B A = U diag(S) V^T`` (thin), through two thin QRs and an SVD of the small core, without
    forming ``B A``."""
    Qb, Rb = torch.linalg.qr(B.float())
    Qa, Ra = torch.linalg.qr(A.float().t())
    u, S, vh = torch.linalg.svd(Rb @ Ra.t())
    return Qb @ u, S, Qa @ vh.t()
