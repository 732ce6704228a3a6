"""Importance of parameters and components, and the orthogonality regularizer of SVD-form updates.

Sensitivity (AdaLoRA, Zhang et al., 2023), for every entry ``w`` of a tracked tensor, after each backward pass::

    I     = |w * dL/dw|
    Ibar <- beta1 * Ibar + (1 - beta1) * I             (smoothed sensitivity)
    Ubar <- beta2 * Ubar + (1 - beta2) * |I - Ibar|    (uncertainty; uses the updated Ibar)
    s     = Ibar * Ubar

A triplet ``i`` of ``P diag(lam) Q`` scores ``S_i = s(lam_i) + mean_j s(Q_ij) + mean_j s(P_ji)``
(:func:`triplet_scores`). The update runs as a handful of ``torch._foreach_*`` kernels over all tracked tensors,
so its cost does not grow with the number of adapted layers in Python overhead.

Orthogonality (AdaLoRA's regularizer): ``R = mean over matrices of ||Q Q^T - I||_F`` (for each ``Q``, r x in)
and ``||P^T P - I||_F`` (for each ``P``, out x r); the norm is not squared, as in the reference code. Its
gradient is ``2 (Q Q^T - I) Q / ||Q Q^T - I||_F`` and ``2 P (P^T P - I) / ||P^T P - I||_F``.
"""
from __future__ import annotations

import torch

from ..sharding import full, is_sharded, shard_like


class Sensitivity:
    """EMA-smoothed sensitivity times uncertainty, per entry of each tracked tensor (keyed by the tensor)."""

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85):
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {beta1}, {beta2}")
        self.beta1, self.beta2 = beta1, beta2
        self.ibar: dict[torch.Tensor, torch.Tensor] = {}
        self.ubar: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, params: list[torch.Tensor]) -> None:
        """One EMA step from the current ``.grad`` of ``params`` (all must have one)."""
        if not params:
            return
        for p in params:
            if p not in self.ibar or self.ibar[p].shape != p.shape:
                self.ibar[p] = torch.zeros_like(p, dtype=torch.float32)
                self.ubar[p] = torch.zeros_like(p, dtype=torch.float32)
        ibar = [self.ibar[p] for p in params]
        ubar = [self.ubar[p] for p in params]
        sens = torch._foreach_mul([p.detach().float() for p in params], [p.grad.float() for p in params])
        torch._foreach_abs_(sens)
        torch._foreach_mul_(ibar, self.beta1)
        torch._foreach_add_(ibar, sens, alpha=1 - self.beta1)
        torch._foreach_sub_(sens, ibar)
        torch._foreach_abs_(sens)
        torch._foreach_mul_(ubar, self.beta2)
        torch._foreach_add_(ubar, sens, alpha=1 - self.beta2)

    def score(self, p: torch.Tensor) -> torch.Tensor:
        """``Ibar * Ubar`` for tensor ``p`` (zeros if it was never updated)."""
        if p not in self.ibar:
            return torch.zeros_like(p, dtype=torch.float32)
        return self.ibar[p] * self.ubar[p]

    def reset(self) -> None:
        self.ibar.clear()
        self.ubar.clear()

    def state_dicts(self) -> list[dict]:
        """The per-entry state dicts (keyed by tensor), for resizing along with the tensors."""
        return [self.ibar, self.ubar]


def triplet_scores(s_P: torch.Tensor, s_lam: torch.Tensor, s_Q: torch.Tensor) -> torch.Tensor:
    """``S_i = s(lam_i) + mean_j s(Q_ij) + mean_j s(P_ji)`` for entry scores of ``P`` (out x r), ``lam`` (r,),
    ``Q`` (r x in)."""
    return s_lam + s_Q.mean(dim=1) + s_P.mean(dim=0)


def _gram_residual(M: torch.Tensor, left: bool) -> torch.Tensor:
    """``M M^T - I`` (left, for Q) or ``M^T M - I`` (for P); an FSDP2-sharded ``M`` is gathered first."""
    M = full(M)
    G = M @ M.t() if left else M.t() @ M
    return G - torch.eye(G.shape[0], dtype=G.dtype, device=G.device)


def orthogonality(Ps: list[torch.Tensor], Qs: list[torch.Tensor]) -> torch.Tensor:
    """``R = mean(||Q Q^T - I||_F over Qs, ||P^T P - I||_F over Ps)``; differentiable."""
    terms = [torch.linalg.matrix_norm(_gram_residual(Q, True)) for Q in Qs if Q.numel()]
    terms += [torch.linalg.matrix_norm(_gram_residual(P, False)) for P in Ps if P.numel()]
    return torch.stack(terms).mean() if terms else torch.zeros(())


@torch.no_grad()
def orthogonality_grad(M: torch.Tensor, left: bool, n: int) -> torch.Tensor:
    """The gradient of one matrix's term of ``R`` (a mean over ``n`` matrices): ``2 E M / (n ||E||_F)`` with
    ``E = M M^T - I`` (``left``, for Q) or ``2 M E / (n ||E||_F)`` with ``E = M^T M - I`` (for P)."""
    if not M.numel():
        return torch.zeros_like(M)
    if is_sharded(M):  # FSDP2 (outside forward): on the gathered matrix, the result sharded like M
        return shard_like(orthogonality_grad(full(M), left, n), M)
    E = _gram_residual(M.detach(), left)
    norm = float(torch.linalg.matrix_norm(E))
    coef = 2.0 / (n * norm) if norm > 0 else 0.0
    return (E @ M if left else M @ E) * coef


@torch.no_grad()
def orthogonality_grads(Ps: list[torch.Tensor], Qs: list[torch.Tensor]) -> tuple[list, list]:
    """``(dR/dP for each P, dR/dQ for each Q)`` in closed form (see the module docstring)."""
    n = sum(1 for M in [*Ps, *Qs] if M.numel())
    return [orthogonality_grad(P, False, n) for P in Ps], [orthogonality_grad(Q, True, n) for Q in Qs]
