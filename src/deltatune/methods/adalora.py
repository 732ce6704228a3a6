"""AdaLoRA (Zhang et al., ICLR 2023): adaptive budget allocation over gated SVD triplets.

Every adapted matrix starts with ``init_r`` triplets of ``dW = s * P diag(lam * mask) Q`` (``lam = 0``,
``P, Q ~ N(0, 0.02^2)``, so ``dW = 0``) and ``s = alpha / init_r``, a constant that does not change when triplets
are pruned (as in the reference code). After each optimizer step ``t`` the controller scores every triplet ``i`` by
its smoothed sensitivity (:mod:`deltatune.budget.importance`)::

    I(w) = |w * dL/dw|,   Ibar <- beta1 Ibar + (1 - beta1) I,   Ubar <- beta2 Ubar + (1 - beta2) |I - Ibar|
    S_i  = s(lam_i) + mean_j s(P_ji) + mean_j s(Q_ij),   s(w) = Ibar(w) Ubar(w)

and, on the cubic schedule :func:`deltatune.budget.cubic_budget` in the phases of
:func:`deltatune.budget.masking_phase` (``b_init = sum init_r``, ``b_T = target_r * n_matrices``)::

    warm-up    t <= t_init                b(t) = b_init, no masking
    budgeting  t_init < t <= T - t_final  b(t) = b_T + (b_init - b_T) (1 - (t - t_init) / (T - t_final - t_init))^3
                                          every delta_t steps: keep the b(t) best triplets over all matrices
                                          together, the others get lam = 0 (they can grow back until the next masking)
    final      t > T - t_final            the pattern of b_T triplets fixed at T - t_final (or the last step) stays

Beyond the reference, the final pattern's pruned triplets are *physically removed* (``shrink="final"``): rows of
``Q``, columns of ``P``, entries of ``lam``, their gradients and optimizer state, so every later step costs what
the final ranks cost. ``shrink="each"`` removes them at every masking event (hard pruning, no regrowth);
``shrink="never"`` keeps them behind a frozen mask. The orthogonal regularizer ``gamma * R``
(``R = mean ||Q Q^T - I||_F, ||P^T P - I||_F``, ``gamma = orth_reg_weight``) enters the gradients during backward
through gradient hooks (:class:`~deltatune.methods.gated.GatedController`), whatever the model returns.

Driven by ``dt.step(model, optimizer)`` alone (the deltatune trainer and
:class:`~deltatune.train.DeltatuneCallback` call it, and ``dt.begin`` to pass the number of steps).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..budget import cubic_budget, masking_phase, threshold_masks
from ..budget.schedule import BUDGETING, FINAL
from ..deltas import Delta, GatedSVDDelta
from .base import Method, StepInfo, adapter_dtype, check_dropout
from .gated import GatedController, gated_deltas, int_at_least, svd_triplets_init
from .peft import LORA_KEYS, anything

SHRINK = ("final", "each", "never")


@dataclass
class AdaLoRA(Method):
    """AdaLoRA: SVD-form adapters whose ranks are allocated under a global budget that shrinks from
    ``init_r`` to ``target_r`` per matrix on average. ``alpha`` defaults to ``init_r`` (``s = 1``); the scale is
    ``alpha / init_r`` throughout. ``total_step`` (optimizer steps) is filled in by the deltatune trainer and
    the HF callback when left unset."""

    name = "adalora"

    init_r: int = 12
    target_r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    t_init: int = 0
    t_final: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    shrink: str = "final"

    def validate(self) -> None:
        int_at_least("init_r", self.init_r)
        int_at_least("target_r", self.target_r)
        int_at_least("delta_t", self.delta_t)
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        if self.t_init < 0 or self.t_final < 0:
            raise ValueError("t_init and t_final must be >= 0")
        if self.total_step is not None and self.t_init + self.t_final >= self.total_step:
            raise ValueError(f"t_init + t_final ({self.t_init} + {self.t_final}) must be < total_step "
                             f"({self.total_step}): the budget has no steps to shrink over")
        if self.shrink not in SHRINK:
            raise ValueError(f"shrink must be one of {SHRINK}, got {self.shrink!r}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        check_dropout(self.dropout)

    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.init_r) / self.init_r

    def build(self, module_name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> GatedSVDDelta:
        out_f, in_f = weight.shape
        delta = GatedSVDDelta(out_f, in_f, self.init_r, self.scale(), self.dropout, dtype=adapter_dtype(weight),
                              device=weight.device)
        return svd_triplets_init(delta)

    def controller(self, deltas: dict[str, Delta], model: nn.Module) -> "AdaLoRAController":
        return AdaLoRAController(self, gated_deltas(deltas))

    # -- PEFT AdaLoRA checkpoints (already cut to the final rank pattern; scale lora_alpha / init_r) ----------
    peft_type = "ADALORA"
    peft_structure = "gated_svd"
    peft_required = ("init_r", "lora_alpha")
    #: AdaLoRA's own keys on top of LoRA's (its rank_pattern holds the final masks; the tensors are already cut)
    peft_keys = {**LORA_KEYS, **{k: anything for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1",
                                                        "beta2", "orth_reg_weight", "total_step")}}

    @classmethod
    def peft_rank(cls, config: dict, mod: str, source: str) -> None:
        return None  # the triplets are cut to their final ranks: nothing to check against

    @classmethod
    def peft_scale(cls, config: dict, mod: str, r: int, source: str) -> float:
        """``lora_alpha / init_r`` (PEFT keeps the initial rank as ``ranknum``; ``lora_alpha <= 0``: 1)."""
        init_r, alpha = int(config["init_r"]), config["lora_alpha"]
        return (alpha if alpha > 0 else init_r) / init_r

    @classmethod
    def from_peft_config(cls, config: dict, targets: list[str], saved: list[str]) -> dict:
        """This method's config (as :meth:`to_dict` would give it) for a PEFT AdaLoRA ``config``."""
        init_r, alpha = int(config["init_r"]), config["lora_alpha"]
        return {"method": cls.name, "init_r": init_r, "target_r": int(config.get("target_r", init_r)),
                "alpha": alpha if alpha > 0 else init_r, "dropout": config.get("lora_dropout", 0.0),
                "t_init": config.get("tinit", 0), "t_final": config.get("tfinal", 0),
                "delta_t": config.get("deltaT", 1), "beta1": config.get("beta1", 0.85),
                "beta2": config.get("beta2", 0.85), "orth_reg_weight": config.get("orth_reg_weight", 0.5),
                "total_step": config.get("total_step"), "targets": targets, "modules_to_save": saved or None}


class AdaLoRAController(GatedController):
    """Sensitivity every step before the final pattern; masking to the cubic budget every ``delta_t`` steps;
    the final pattern fixed (and shrunk) at ``T - t_final``."""

    def __init__(self, method: AdaLoRA, deltas: dict[str, GatedSVDDelta]):
        super().__init__(deltas, method.total_step, method.beta1, method.beta2)
        self.m = method
        self.b_init = sum(d.r for d in deltas.values())
        self.b_target = method.target_r * len(deltas)
        self.budget = self.b_init
        self.final = False
        self._orth_hooks(method.orth_reg_weight)

    def begin(self, info: StepInfo) -> None:
        super().begin(info)
        if self.total is not None and self.m.t_init + self.m.t_final >= self.total:
            raise ValueError(f"t_init + t_final ({self.m.t_init} + {self.m.t_final}) must be < the number of "
                             f"optimizer steps ({self.total})")
        if not info.resumed:
            self.final = False

    def state_dict(self) -> dict:
        """Also the budget: its start ``b_init`` (the ranks held before any pruning), the current ``budget`` and
        whether the final pattern is fixed."""
        return {**super().state_dict(), "b_init": self.b_init, "budget": self.budget, "final": self.final}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.b_init = int(state.get("b_init", self.b_init))
        self.budget = int(state.get("budget", self.budget))
        self.final = bool(state.get("final", self.final))

    def budget_at(self, step: int) -> int:
        return cubic_budget(step, self.b_init, self.b_target, self.m.t_init, self.m.t_final, self.total)

    def final_step(self) -> int:
        """The step at which the final pattern is fixed: ``T - t_final``, or the last step when ``t_final = 0``."""
        return min(self.total - self.m.t_final, self.total - 1)

    def after_step(self, info: StepInfo) -> bool:
        step, optimizer = info.step, info.optimizer
        self._check_step(step)
        self._arm()
        self.resizable = info.resizable
        phase = masking_phase(step, self.m.t_init, self.m.t_final, self.total)
        if not self.final and phase == FINAL:  # resumed past the final step: keep the pattern as it is
            self.final = True
            self.budget = self.b_target
        if self.final:
            return False
        if step < self.total - self.m.t_final:  # sensitivity up to (not at) the step T - t_final
            self._update_importance()
        self.budget = self.budget_at(step)
        # the final pattern is fixed at the last step before the final phase: T - t_final (the last step when
        # t_final = 0, even if that step is still warm-up)
        last = step == self.total - 1 or masking_phase(step + 1, self.m.t_init, self.m.t_final, self.total) == FINAL
        if not last and not (phase == BUDGETING and step % self.m.delta_t == 0):
            return False
        if not self.sens.ibar:  # no importance gathered yet (resumed right at a masking step): nothing to rank by
            return False
        budget = self.b_target if last else self.budget
        keeps = threshold_masks(self._scores(), budget)
        hard = last and self.m.shrink != "never" or self.m.shrink == "each"
        if hard:
            self._check_optimizer(optimizer)
        changed = False
        for d, keep in zip(self.deltas.values(), keeps):
            if hard and not bool(keep.all()):
                self._keep(d, keep, optimizer)
                changed = self.resizable
            elif last:  # shrink="never": the final pattern stays behind a frozen mask
                self._mask_out(d, keep)
            else:  # soft: the gate is zeroed, the triplet may grow back before the next masking
                with torch.no_grad():
                    d.lam[~keep] = 0
        if last:
            self.final = True
            self.budget = self.b_target
            self.sens.reset()
        return changed

    def metrics(self) -> dict[str, float]:
        return {"budget": self.budget, "rank": self.live_rank()}


__all__ = ["AdaLoRA", "AdaLoRAController", "SHRINK"]
