"""IncreLoRA (Zhang et al., 2023): ranks that grow where the importance is highest.

Every adapted matrix starts with ``init_r`` gated SVD triplets ``dW = s * P diag(lam) Q`` (``lam = 0``,
``P, Q ~ N(0, 0.02^2)``) and the scale is ``s = alpha / r`` for the matrix's current rank ``r`` (as in the
reference). Importance per matrix ``k`` is the mean triplet score of AdaLoRA's sensitivity engine
(:mod:`deltatune.budget.importance`)::

    S_k = mean_i S_i,    S_i = s(lam_i) + mean_j s(P_ji) + mean_j s(Q_ij)

and at every step ``t > init_warmup`` with ``(t - init_warmup) % incre_interval == 0`` the ``top_h`` matrices with
the highest ``S_k`` get ``add_r`` new triplets each (``lam = 0``, ``P, Q ~ N(0, 0.02^2)``), until the total rank
reaches ``target_r * n_matrices``. ``incre_interval=None`` spreads the growth evenly over the first half of the
``T`` steps: ``max(1, (T // 2 - init_warmup) // ceil(growth / (top_h * add_r)))``.

Growing replaces a matrix's ``P``, ``lam``, ``Q`` by larger tensors and moves the optimizer over to them
(:mod:`deltatune.budget.resize`: zero first moments, second moments started at the tensor's mean). Deviations from
the reference: the reference scores ``|dW * dL/ddW|``, which costs one extra out x in product per layer and step;
there are no reserve ("advance learning") triplets, which would cost compute on every step; and the orthogonal
regularizer acts on each whole ``P`` and ``Q`` (the reference applies it per rank-1 block, which only normalizes
each vector).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..budget import broadcast_, grow_components_, top_modules, triplet_scores
from ..deltas import Delta, GatedSVDDelta
from .base import Method, StepInfo, adapter_dtype
from .gated import INIT_STD, GatedController, gated_deltas, int_at_least, svd_triplets_init


@dataclass
class IncreLoRA(Method):
    """IncreLoRA: ranks grow from ``init_r`` towards an average of ``target_r`` per matrix, ``top_h`` matrices
    at a time, where the importance is highest. ``incre_interval=None`` spreads the growth evenly over the
    first half of training (needs the number of steps, which the trainer provides). ``alpha`` defaults to
    ``target_r``; the scale is ``alpha / current rank``."""

    name = "increlora"

    init_r: int = 2
    target_r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    init_warmup: int = 0
    incre_interval: int | None = None
    top_h: int = 2
    add_r: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    total_step: int | None = None

    def validate(self) -> None:
        int_at_least("init_r", self.init_r)
        int_at_least("target_r", self.target_r)
        int_at_least("top_h", self.top_h)
        int_at_least("add_r", self.add_r)
        if self.incre_interval is not None:
            int_at_least("incre_interval", self.incre_interval)
        if self.target_r < self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must be >= init_r ({self.init_r})")
        if self.init_warmup < 0 or self.orth_reg_weight < 0:
            raise ValueError("init_warmup and orth_reg_weight must be >= 0")

    def scale(self, r: int) -> float:
        return (self.alpha if self.alpha is not None else self.target_r) / max(1, r)

    def build(self, module_name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> GatedSVDDelta:
        out_f, in_f = weight.shape
        delta = GatedSVDDelta(out_f, in_f, self.init_r, self.scale(self.init_r), self.dropout,
                              dtype=adapter_dtype(weight), device=weight.device)
        return svd_triplets_init(delta)

    def controller(self, deltas: dict[str, Delta], model: nn.Module) -> "IncreLoRAController":
        return IncreLoRAController(self, gated_deltas(deltas))


class IncreLoRAController(GatedController):
    def __init__(self, method: IncreLoRA, deltas: dict[str, GatedSVDDelta]):
        super().__init__(deltas, method.total_step, method.beta1, method.beta2)
        self.m = method
        self.budget = method.target_r * len(deltas)
        self.interval = self._interval()
        self._orth_hooks(method.orth_reg_weight)

    def total_rank(self) -> int:
        return sum(d.r for d in self.deltas.values())

    def _interval(self) -> int | None:
        """``incre_interval``, or one that spreads the growth over the first half of ``total`` steps."""
        if self.m.incre_interval is not None or self.total is None:
            return self.m.incre_interval
        events = math.ceil(max(0, self.budget - self.total_rank()) / (self.m.top_h * self.m.add_r))
        return max(1, (self.total // 2 - self.m.init_warmup) // max(1, events))

    def begin(self, info: StepInfo) -> None:
        super().begin(info)
        if not info.resizable and self.total_rank() < self.budget:
            raise ValueError("IncreLoRA grows parameters while training, which this setup cannot follow (a DDP "
                             "wrapper that cannot be rebuilt); train with deltatune.train.train, which rebuilds it")
        if not info.resumed or self.interval is None:  # resumed: the interval chosen at the start stays
            self.interval = self._interval()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "interval": self.interval}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.interval = state.get("interval", self.interval)

    def after_step(self, info: StepInfo) -> bool:
        step, optimizer = info.step, info.optimizer
        self._check_step(step, need_total=self.m.incre_interval is None)
        self._arm()
        self.resizable = info.resizable
        if self.total_rank() >= self.budget:
            return False
        self._update_importance()
        if self.interval is None:
            raise ValueError("IncreLoRA needs incre_interval, or the number of steps (dt.begin(model, total_steps)) "
                             "to choose one")
        if step <= self.m.init_warmup or (step - self.m.init_warmup) % self.interval != 0:
            return False
        self._check_optimizer(optimizer)
        module_scores = torch.stack([triplet_scores(self.sens.score(d.P), self.sens.score(d.lam),
                                                    self.sens.score(d.Q)).mean() for d in self.deltas.values()])
        broadcast_([module_scores])
        room = self.budget - self.total_rank()
        chosen = top_modules(module_scores, min(self.m.top_h, math.ceil(room / self.m.add_r)))
        deltas = list(self.deltas.values())
        for i in chosen:
            n = min(self.m.add_r, self.budget - self.total_rank())
            if n <= 0:
                break
            d = deltas[i]
            grow_components_(d, n, optimizer, self.sens.state_dicts(), std=INIT_STD)
            self._rehook(d)
            d.scale = self.m.scale(d.r)
        return bool(chosen)

    def metrics(self) -> dict[str, float]:
        return {"budget": self.budget, "rank": self.total_rank()}


__all__ = ["IncreLoRA", "IncreLoRAController"]
