"""SORSA: singular values and orthonormal regularized singular vectors adaptation (Cao, 2024).

Init: the top ``r`` singular triplets of ``W`` (float32 SVD), ``P = U_r`` (out x r), ``lam = S_r``, ``Q = Vh_r``
(r x in), and the layer trains on the residual ``W_res = W - s P diag(lam) Q``; ``s = alpha / r``, or 1 when
``alpha`` is None (the reference's default). All of ``P, lam, Q`` train::

    y = W_res x + s P diag(lam) Q x        (= W x at init)

deltatune keeps ``W`` untouched: the delta is ``s (P diag(lam) Q - P0 diag(lam0) Q0)`` with the initial triplets
frozen as an anchor (:class:`~deltatune.deltas.GatedSVDDelta`), which saves as a plain low-rank update of ``W``.

Regularizer: ``R = mean over the adapter's matrices of ||Q Q^T - I||_F and ||P^T P - I||_F`` (not squared). As in
the reference it bypasses the loss and gradient clipping: after clipping and before the optimizer step the
controller adds ``(gamma / lr_peak) dR/dP`` and ``dR/dQ`` to the gradients (closed form,
:func:`deltatune.budget.orthogonality_grads`), so its effective step follows the learning-rate schedule.
``lr_peak`` is ``lr`` when given, else the largest ``initial_lr`` (or ``lr``) of the optimizer's groups. The
deltatune trainer and :class:`~deltatune.train.DeltatuneCallback` call ``dt.after_backward(model, optimizer)`` at
that point; in a bare loop call it yourself (the regularizer is skipped otherwise). Under fp16 loss scaling call it
after ``scaler.unscale_(optimizer)``: on still-scaled gradients the added term would be divided by the loss scale.

Paper settings: ``gamma = 4e-4``, lr 3e-5, ``r = 128``, weight decay 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..budget import orthogonality, orthogonality_grads
from ..deltas import Delta, GatedSVDDelta
from .base import Controller, Method, StepInfo, adapter_dtype, check_dropout
from .lora import svd_triplets


def peak_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest ``initial_lr`` (set by LR schedulers) or ``lr`` over the optimizer's parameter groups."""
    return max(float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups)


class SORSAController(Controller):
    """Adds ``(gamma / lr_peak) dR/dM`` to the gradient of every trainable ``P`` and ``Q`` before the update."""

    def __init__(self, deltas: list[GatedSVDDelta], gamma: float, lr: float | None):
        self.deltas, self.gamma, self.lr = deltas, gamma, lr
        self.last = float("nan")

    @torch.no_grad()
    def regularizer(self) -> torch.Tensor:
        """The current value of ``R``."""
        return orthogonality([d.P for d in self.deltas], [d.Q for d in self.deltas])

    @torch.no_grad()
    def after_backward(self, info: StepInfo) -> None:
        lr = self.lr if self.lr is not None else (peak_lr(info.optimizer) if info.optimizer is not None else None)
        if lr is None or self.gamma == 0:
            return
        live = [d for d in self.deltas if d.P.requires_grad]
        gP, gQ = orthogonality_grads([d.P for d in live], [d.Q for d in live])
        for d, p_grad, q_grad in zip(live, gP, gQ):
            for param, g in ((d.P, p_grad), (d.Q, q_grad)):
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                param.grad.add_(g.to(param.grad.dtype), alpha=self.gamma / lr)
        self.last = float(self.regularizer())

    def metrics(self) -> dict[str, float]:
        return {"orthogonality": self.last}


@dataclass
class SORSA(Method):
    """Top-``r`` SVD triplets trained on the residual, with SORSA's orthonormal regularizer (``gamma``)."""

    name = "sorsa"

    r: int = 8
    alpha: float | None = None
    gamma: float = 4e-4
    lr: float | None = None
    niter: int | None = None
    dropout: float = 0.0

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"SORSA rank must be a positive integer, got r={self.r!r}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr (the peak learning rate) must be positive, got {self.lr}")
        check_dropout(self.dropout)

    def build(self, module_name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> GatedSVDDelta:
        out_f, in_f = weight.shape
        if self.r > min(out_f, in_f):
            raise ValueError(f"{module_name}: rank {self.r} exceeds min(out, in) = {min(out_f, in_f)}")
        U, S, Vh = svd_triplets(weight, self.r, "top", self.niter)
        s = self.alpha / self.r if self.alpha is not None else 1.0
        delta = GatedSVDDelta(out_f, in_f, self.r, s, self.dropout, dtype=adapter_dtype(weight),
                              device=weight.device, anchored=True)
        with torch.no_grad():
            delta.P.copy_(U)
            delta.lam.copy_(S)
            delta.Q.copy_(Vh)
        delta.anchor_()
        return delta

    def controller(self, deltas: dict[str, Delta], model: nn.Module) -> Controller | None:
        return SORSAController([d for d in deltas.values() if isinstance(d, GatedSVDDelta)], self.gamma, self.lr)
