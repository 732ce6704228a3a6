"""SoRA (Ding et al., EMNLP 2023): sparse low-rank adaptation with gates pruned by a proximal step.

``h = W x + s * P (g * (Q x))`` with ``s = alpha / r_max``, ``Q`` Kaiming-uniform, ``P = 0`` and gates
``g ~ N(0, 1)`` (a :class:`~deltatune.deltas.GatedSVDDelta` with ``lam = g``). After every optimizer step the gates
take the proximal step of ``xi * ||g||_1``::

    g <- sign(g) max(|g| - xi, 0)          (xi = threshold, not scaled by the learning rate, as in the reference)

``l1_weight`` adds ``lambda * mean|g|`` per matrix to the loss gradient (through a gradient hook); it defaults to 0
here (the reference's scripts set ``sparse_lambda = 10``; with Adam that term dominates the gates' updates). At the
last step the triplets whose gate is exactly 0 are dropped (:meth:`SoRAController.drop_zero_gates`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..deltas import Delta, GatedSVDDelta
from .base import Method, StepInfo, adapter_dtype, check_dropout
from .gated import GatedController, gated_deltas, int_at_least


def soft_threshold_(g: torch.Tensor, xi: float) -> torch.Tensor:
    """The proximal step of ``xi * |g|_1``: ``g <- sign(g) max(|g| - xi, 0)``, in place."""
    return g.copy_(torch.sign(g) * (g.abs() - xi).clamp_min_(0))


@dataclass
class SoRA(Method):
    """SoRA: gated low-rank update with sparsity from a proximal step on the gates; zero-gate ranks are dropped
    at the end of training. ``r`` is ``r_max``; ``alpha`` defaults to ``r`` (``s = alpha / r_max``)."""

    name = "sora"

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    threshold: float = 3e-4
    l1_weight: float = 0.0
    total_step: int | None = None

    def validate(self) -> None:
        int_at_least("r", self.r)
        if self.threshold < 0 or self.l1_weight < 0:
            raise ValueError("threshold and l1_weight must be >= 0")
        check_dropout(self.dropout)

    def build(self, module_name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> GatedSVDDelta:
        out_f, in_f = weight.shape
        scale = (self.alpha if self.alpha is not None else self.r) / self.r
        delta = GatedSVDDelta(out_f, in_f, self.r, scale, self.dropout, dtype=adapter_dtype(weight),
                              device=weight.device)
        with torch.no_grad():
            nn.init.kaiming_uniform_(delta.Q, a=math.sqrt(5))
            nn.init.normal_(delta.lam)
        return delta

    def controller(self, deltas: dict[str, Delta], model: nn.Module) -> "SoRAController":
        return SoRAController(self, gated_deltas(deltas))


class SoRAController(GatedController):
    def __init__(self, method: SoRA, deltas: dict[str, GatedSVDDelta]):
        super().__init__(deltas, method.total_step)
        self.m = method
        if method.l1_weight > 0:  # d/dg of l1_weight * mean|g|, per matrix
            for d in deltas.values():
                self._add_grad_hook(d, "lam", lambda g: torch.sign(g.detach()) * (method.l1_weight / max(1, g.numel())))

    def after_step(self, info: StepInfo) -> bool:
        step, optimizer = info.step, info.optimizer
        self._check_step(step, need_total=False)
        self._arm()
        self.resizable = info.resizable
        with torch.no_grad():
            for d in self.deltas.values():
                soft_threshold_(d.lam, self.m.threshold)
        if self.total is None or step != self.total - 1:
            return False
        return self.drop_zero_gates(optimizer)

    def drop_zero_gates(self, optimizer=None) -> bool:
        """Remove the triplets whose gate is exactly 0 (done automatically at the last step)."""
        if any(not bool((d.lam != 0).all()) for d in self.deltas.values()):
            self._check_optimizer(optimizer)
        changed = False
        for d in self.deltas.values():
            keep = d.lam.detach() != 0
            if not bool(keep.all()):
                self._keep(d, keep, optimizer)
                changed = self.resizable
        return changed

    def metrics(self) -> dict[str, float]:
        return {"rank": self.live_rank()}


__all__ = ["SoRA", "SoRAController", "soft_threshold_"]
