"""Merge arithmetic over task vectors (dense weight deltas of one layer), as pure tensor functions.

For task vectors ``tau_t`` (same shape) and weights ``w_t``:

- **task arithmetic** (Ilharco et al., 2023): ``sum_t w_t tau_t``;
- **magnitude pruning**: keep the ``density`` fraction of entries with the largest ``|tau|``, zero the rest;
- **TIES** (Yadav et al., NeurIPS 2023): *trim* each ``tau_t`` to its top-``density`` magnitudes (``hat tau_t``),
  *elect* a sign per entry, ``gamma = sign(sum_t w_t hat tau_t)``, and take the *disjoint mean* over the tasks
  that agree with it, ``sum_{t: sign(hat tau_t) = gamma} w_t hat tau_t / sum_{t: sign(hat tau_t) = gamma} w_t``
  (with unit weights: the plain mean over the agreeing tasks; entries where nobody agrees are 0);
- **DARE** (Yu et al., ICML 2024): drop each entry with probability ``1 - density`` and rescale the survivors by
  ``1 / density`` (so the expectation is unchanged), then combine linearly or with TIES's sign consensus.

All functions take and return tensors; nothing here knows about layers or adapters.
"""
from __future__ import annotations

import math

import torch

from ..checks import finite_number


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")


def _weights(n: int, weights) -> list[float]:
    w = [1.0] * n if weights is None else [finite_number(x, f"weight {i}") for i, x in enumerate(weights)]
    if len(w) != n:
        raise ValueError(f"got {len(w)} weights for {n} task vectors")
    return w


def task_arithmetic(taus: list[torch.Tensor], weights=None) -> torch.Tensor:
    """``sum_t w_t tau_t``."""
    w = _weights(len(taus), weights)
    out = torch.zeros_like(taus[0])
    for wt, t in zip(w, taus):
        out.add_(t, alpha=wt)
    return out


def magnitude_prune(tau: torch.Tensor, density: float) -> torch.Tensor:
    """``tau`` with all but its ``ceil(density * numel)`` largest-magnitude entries set to 0 (ties: lower index)."""
    _check_density(density)
    k = max(1, math.ceil(density * tau.numel() - 1e-9))  # 0.2 * 10 is 2.0000000000000004 in floats
    if k >= tau.numel():
        return tau.clone()
    flat = tau.flatten()
    keep = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view_as(tau)


def elect_sign(taus: list[torch.Tensor], weights=None) -> torch.Tensor:
    """``sign(sum_t w_t tau_t)`` per entry (TIES's "total mass" election)."""
    return torch.sign(task_arithmetic(taus, weights))


def disjoint_mean(taus: list[torch.Tensor], sign: torch.Tensor, weights=None) -> torch.Tensor:
    """Weighted mean over the tasks whose entry is nonzero and has the elected ``sign`` (0 where none does)."""
    w = _weights(len(taus), weights)
    num = torch.zeros_like(taus[0])
    den = torch.zeros_like(taus[0])
    for wt, t in zip(w, taus):
        agree = (torch.sign(t) == sign) & (t != 0)
        num += torch.where(agree, wt * t, 0.0)
        den += agree.to(t.dtype) * wt
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)


def ties(taus: list[torch.Tensor], weights=None, density: float = 0.2) -> torch.Tensor:
    """TIES: trim each task vector to its top-``density`` magnitudes, elect signs, disjoint (weighted) mean."""
    trimmed = [magnitude_prune(t, density) for t in taus]
    return disjoint_mean(trimmed, elect_sign(trimmed, weights), weights)


def dare_drop(tau: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each entry with probability ``density`` and rescale the kept ones by ``1 / density``."""
    _check_density(density)
    keep = torch.rand(tau.shape, generator=generator, device=tau.device) < density
    return torch.where(keep, tau / density, 0.0)


def dare(taus: list[torch.Tensor], weights=None, density: float = 0.5, consensus: str = "linear",
         generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: random drop and rescale of every task vector, then ``"linear"`` (weighted sum) or ``"ties"`` (sign
    election and disjoint mean) consensus."""
    dropped = [dare_drop(t, density, generator) for t in taus]
    if consensus == "linear":
        return task_arithmetic(dropped, weights)
    if consensus == "ties":
        return disjoint_mean(dropped, elect_sign(dropped, weights), weights)
    raise ValueError(f"unknown DARE consensus {consensus!r}; choose 'linear' or 'ties'")
