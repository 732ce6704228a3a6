"""Adaptive-rank methods on gated SVD triplets ``dW = s * P diag(lam * mask) Q`` and one budget engine.

**AdaLoRA** (Zhang et al., ICLR 2023). Every adapted matrix starts with ``init_r`` triplets (``lam = 0``,
``P, Q ~ N(0, 0.02^2)``, so ``dW = 0``) and ``s = alpha / init_r``, a constant that does not change when triplets
are pruned (as in the reference code). After each optimizer step the controller scores every triplet by its
smoothed sensitivity (:mod:`deltatune.budget.importance`) and, on AdaLoRA's cubic schedule
(:mod:`deltatune.budget.schedule`), keeps the ``b(t)`` best triplets over all matrices together: the others get
``lam = 0`` (soft: they can grow back until the next masking). At ``T - t_final`` (or the last step) the final
pattern of ``target_r * n_matrices`` triplets is fixed and, beyond the reference, the pruned triplets are
*physically removed* (``shrink="final"``): rows of ``Q``, columns of ``P``, entries of ``lam``, their gradients and
optimizer state, so every later step costs what the final ranks cost. ``shrink="each"`` removes them at every
masking event (hard pruning, no regrowth); ``shrink="never"`` keeps them behind a frozen mask. The orthogonal
regularizer ``gamma * R`` (``R = mean ||Q Q^T - I||_F, ||P^T P - I||_F``) enters the gradients during backward
through gradient hooks, whatever the model returns. (Under fp16 loss scaling the hooks would add an unscaled term
to scaled gradients, which the scaler then divides away: use bf16 or fp32 with the regularizer.)

**IncreLoRA** (Zhang et al., 2023). The rank *grows*: every matrix starts with ``init_r`` triplets, and every
``incre_interval`` steps after ``init_warmup`` the ``top_h`` matrices with the highest importance get ``add_r``
new triplets (``lam = 0``, ``P, Q ~ N(0, 0.02^2)``) until the total reaches ``target_r * n_matrices``. The scale
is ``alpha / current rank`` as in the reference. Importance per matrix is the mean triplet score of the shared
sensitivity engine (the reference scores ``|dW * dL/ddW|``, which costs one extra out x in product per layer
and step). Growing replaces a matrix's ``P``, ``lam``, ``Q`` by larger tensors and moves the optimizer over to
them (:mod:`deltatune.budget.resize`: zero first moments, second moments started at the tensor's mean). Two more
deviations from the reference: there are no reserve ("advance learning") triplets, which would cost compute on
every step, and the orthogonal regularizer acts on each whole ``P`` and ``Q`` (the reference applies it per rank-1
block, which only normalizes each vector).

**SoRA** (Ding et al., EMNLP 2023). ``h = W x + s * P (g * (Q x))`` with ``s = alpha / r_max``, ``Q`` Kaiming-uniform,
``P = 0`` and gates ``g ~ N(0, 1)``. After every optimizer step the gates take a proximal step
``g <- sign(g) max(|g| - xi, 0)`` (``xi = threshold``, not scaled by the learning rate, as in the reference);
``l1_weight`` adds ``lambda * mean|g|`` per matrix to the loss gradient; it defaults to 0 here (the reference's
scripts set ``sparse_lambda = 10``; with Adam that term dominates the gates' updates). At the end of training the
triplets whose gate is exactly 0 are dropped.

All three are driven by ``dt.step(model, optimizer)`` alone (the deltatune trainer and
:class:`~deltatune.train.DeltatuneCallback` call it, and ``dt.begin`` to pass the number of steps). Under
``torch.distributed`` every decision is made from rank 0's scores, so all ranks prune and grow alike.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..budget import (
    Sensitivity,
    broadcast_,
    cubic_budget,
    grow_components_,
    keep_components_,
    orthogonality,
    orthogonality_grad,
    threshold_masks,
    top_modules,
    triplet_scores,
)
from ..deltas import GatedSVDDelta
from .base import Controller, Method, adapter_dtype, check_dropout, resumed
from .peft import LORA_KEYS, anything

SHRINK = ("final", "each", "never")
INIT_STD = 0.02


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def svd_triplets_init(delta: GatedSVDDelta, std: float = INIT_STD) -> GatedSVDDelta:
    """AdaLoRA's init: ``lam = 0``, ``P, Q ~ N(0, std^2)`` (so ``dW = 0``)."""
    with torch.no_grad():
        nn.init.normal_(delta.P, std=std)
        nn.init.normal_(delta.Q, std=std)
        delta.lam.zero_()
    return delta


def gated_deltas(model: nn.Module, adapter_name: str) -> dict[str, GatedSVDDelta]:
    """``{module name: delta}`` of the adapter's gated-SVD deltas (its ``modules_to_save`` entries left out)."""
    from .. import model as M
    return {k: d for k, d in M.deltas(model, adapter_name).items() if isinstance(d, GatedSVDDelta)}


# -- the shared controller machinery ------------------------------------------------------------------------------
class GatedController(Controller):
    """Common parts of the gated-SVD controllers: the step budget (``total_step``), gradient checks, in-place
    resizing that keeps the optimizer and the importance state in step, and loss terms added through gradient
    hooks (so they apply once per optimizer step, for any model output, under DDP and accumulation alike)."""

    def __init__(self, deltas: dict[str, GatedSVDDelta], total_step: int | None, beta1: float = 0.85,
                 beta2: float = 0.85):
        self.deltas = deltas
        self.configured_total = total_step
        self.total = total_step
        self.resizable = True
        self.sens = Sensitivity(beta1, beta2)
        self._due: dict[nn.Parameter, bool] = {}
        self._hooks: dict[tuple[int, str], tuple[GatedSVDDelta, object, object]] = {}

    # -- loss terms as gradient hooks ---------------------------------------------------------------------
    def _add_grad_hook(self, delta: GatedSVDDelta, attr: str, grad_fn) -> None:
        """Add ``grad_fn(param)`` to the gradient of ``delta.<attr>`` once per optimizer step, right after the
        first backward pass of the step accumulates into it (later micro-batches of the step add nothing)."""
        def hook(p: torch.Tensor) -> None:
            if self._due.get(p, False) and p.grad is not None:
                self._due[p] = False
                p.grad.add_(grad_fn(p).to(p.grad.dtype))
        param = getattr(delta, attr)
        self._due[param] = True
        self._hooks[(id(delta), attr)] = (delta, hook, param.register_post_accumulate_grad_hook(hook))

    def _rehook(self, delta: GatedSVDDelta) -> None:
        """Move the hooks of ``delta`` to its new parameters after a resize."""
        for (key_id, attr), (d, hook, handle) in list(self._hooks.items()):
            if key_id == id(delta):
                handle.remove()
                self._hooks[(key_id, attr)] = (d, hook, getattr(d, attr).register_post_accumulate_grad_hook(hook))
        self._arm()

    def _arm(self) -> None:
        self._due = {getattr(d, attr): True for (_, attr), (d, _, _) in self._hooks.items()}

    def _orth_hooks(self, weight: float) -> None:
        """AdaLoRA's orthogonal regularizer ``weight * R`` over all P and Q of this adapter."""
        if weight <= 0:
            return
        n = lambda: sum(2 for d in self.deltas.values() if d.r)  # noqa: E731 (ranks change while training)
        for d in self.deltas.values():
            self._add_grad_hook(d, "Q", lambda p: orthogonality_grad(p, True, n()) * weight)
            self._add_grad_hook(d, "P", lambda p: orthogonality_grad(p, False, n()) * weight)

    # -- protocol -------------------------------------------------------------------------------------------
    def begin(self, model: nn.Module, total_steps: int | None, resizable: bool = True) -> None:
        if self.configured_total is None:
            self.total = total_steps if total_steps is not None or not resumed(model) else self.total
        elif total_steps is not None and total_steps > self.configured_total:
            raise ValueError(f"the method was configured with total_step={self.configured_total}, but training runs "
                             f"{total_steps} optimizer steps; set total_step={total_steps} (or leave it unset)")
        elif total_steps is not None and total_steps < self.configured_total:
            warnings.warn(f"the method was configured with total_step={self.configured_total}, but training runs "
                          f"only {total_steps} optimizer steps: the schedule will not finish (no final pattern, no "
                          "pruning at the end); leave total_step unset to follow the run", stacklevel=3)
        self.resizable = resizable
        if not resumed(model):
            self.sens.reset()
        self._arm()

    # -- state ----------------------------------------------------------------------------------------------
    _TRACKED = ("P", "lam", "Q")

    def _per_module(self, store: dict) -> dict:
        """``{module: {tensor name: state}}`` of a per-parameter dict such as the sensitivity EMAs."""
        out = {mod: {a: store[getattr(d, a)] for a in self._TRACKED if getattr(d, a) in store}
               for mod, d in self.deltas.items()}
        return {mod: v for mod, v in out.items() if v}

    def state_dict(self) -> dict:
        """``total``, the sensitivity EMAs ``ibar``/``ubar`` per module and tensor, and ``hidden``: all components
        (``P, lam, Q, mask``) of the deltas that hold masked-off ones, which the adapter file leaves out but which
        a resumed run still carries (``shrink="never"``, ``resizable=False``)."""
        hidden = {mod: {"P": d.P, "lam": d.lam, "Q": d.Q, "mask": d.mask} for mod, d in self.deltas.items()
                  if not bool((d.mask != 0).all())}
        return {"total": self.total, "ibar": self._per_module(self.sens.ibar),
                "ubar": self._per_module(self.sens.ubar), "hidden": hidden}

    def _delta(self, mod: str) -> GatedSVDDelta:
        if mod not in self.deltas:
            raise ValueError(f"the controller state names module {mod!r}, which this adapter has no gated delta for")
        return self.deltas[mod]

    def load_state_dict(self, state: dict) -> None:
        self.total = state.get("total", self.total)
        for mod, ts in state.get("hidden", {}).items():
            d = self._delta(mod)
            try:
                d.set_components_(ts)
            except (KeyError, ValueError) as e:
                raise ValueError(f"controller state of {mod!r}: {e}") from None
            self._rehook(d)
        self.sens.reset()
        for key, store in (("ibar", self.sens.ibar), ("ubar", self.sens.ubar)):
            for mod, ts in state.get(key, {}).items():
                d = self._delta(mod)
                for attr, t in ts.items():
                    p = getattr(d, attr)
                    if tuple(t.shape) != tuple(p.shape):
                        raise ValueError(f"controller state {key} of {mod}.{attr} has shape {tuple(t.shape)}, but "
                                         f"the adapter's tensor has {tuple(p.shape)}: state and adapter are from "
                                         "different saves")
                    store[p] = t.to(device=p.device, dtype=torch.float32).clone()

    def _check_step(self, step: int, need_total: bool = True) -> None:
        if self.total is None:
            if need_total:
                raise ValueError(f"{type(self).__name__.replace('Controller', '')} needs the number of optimizer "
                                 "steps: set total_step=... in its config, or call dt.begin(model, total_steps) before "
                                 "training (the deltatune trainer and DeltatuneCallback do)")
            return
        if step >= self.total:
            raise ValueError(f"dt.step was called for step {step + 1}, but the schedule has total_step={self.total} "
                             "optimizer steps; count optimizer steps (after gradient accumulation), or raise "
                             "total_step")

    def _params(self) -> list[nn.Parameter]:
        return [p for d in self.deltas.values() for p in (d.P, d.lam, d.Q) if p.requires_grad]

    def _update_importance(self) -> None:
        params = self._params()
        if not params:
            raise ValueError("the adapter is not trainable (not active?); dt.step drives the active adapters only")
        missing = [p for p in params if p.grad is None]
        if len(missing) == len(params):
            raise RuntimeError("dt.step found no gradients on the adapter: call it after optimizer.step() and "
                               "before optimizer.zero_grad(), once per optimizer step")
        self.sens.update([p for p in params if p.grad is not None])

    def _scores(self) -> list[torch.Tensor]:
        """Triplet scores per delta (rank 0's under torch.distributed)."""
        scores = [triplet_scores(self.sens.score(d.P), self.sens.score(d.lam), self.sens.score(d.Q))
                  for d in self.deltas.values()]
        broadcast_(scores)
        for sc, d in zip(scores, self.deltas.values()):  # masked-off components never take a place in the budget
            sc.masked_fill_(d.mask == 0, float("-inf"))
        return scores

    @staticmethod
    def _mask_out(delta: GatedSVDDelta, keep: torch.Tensor) -> None:
        """Switch the triplets not in ``keep`` off for good (gate zeroed, mask 0), keeping shapes."""
        with torch.no_grad():
            delta.lam[~keep] = 0
        delta.set_mask(delta.mask * keep)

    def _check_optimizer(self, optimizer) -> None:
        if optimizer is None and self.resizable:
            raise ValueError("this step removes or adds parameters: pass the optimizer, dt.step(model, optimizer), so "
                             "that it follows them (or use shrink='never')")

    def _keep(self, delta: GatedSVDDelta, keep: torch.Tensor, optimizer) -> None:
        """Remove the triplets not in ``keep`` (bool) physically, or mask them when shapes must stay."""
        if not self.resizable:
            self._mask_out(delta, keep)
            return
        keep_components_(delta, keep.nonzero().view(-1), optimizer, self.sens.state_dicts())
        self._rehook(delta)

    def live_rank(self) -> int:
        return int(sum(int(d.live().sum()) for d in self.deltas.values()))

    def regularizer(self) -> float:
        """Current value of ``R`` (for logging)."""
        with torch.no_grad():
            return float(orthogonality([d.P for d in self.deltas.values()], [d.Q for d in self.deltas.values()]))


# -- AdaLoRA -------------------------------------------------------------------------------------------------------
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
        _positive_int("init_r", self.init_r)
        _positive_int("target_r", self.target_r)
        _positive_int("delta_t", self.delta_t)
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

    def controller(self, model: nn.Module, adapter_name: str) -> "AdaLoRAController":
        return AdaLoRAController(self, gated_deltas(model, adapter_name))

    # -- PEFT AdaLoRA checkpoints (already cut to the final rank pattern; scale lora_alpha / init_r) ----------
    peft_type = "ADALORA"
    peft_structure = "gated_svd"
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

    def begin(self, model, total_steps, resizable=True):
        super().begin(model, total_steps, resizable)
        if self.total is not None and self.m.t_init + self.m.t_final >= self.total:
            raise ValueError(f"t_init + t_final ({self.m.t_init} + {self.m.t_final}) must be < the number of "
                             f"optimizer steps ({self.total})")
        if not resumed(model):
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

    def after_step(self, model, optimizer, step):
        self._check_step(step)
        self._arm()
        if not self.final and step > self.final_step():  # resumed past the final step: keep the pattern as it is
            self.final = True
            self.budget = self.b_target
        if self.final:
            return False
        if step < self.total - self.m.t_final:
            self._update_importance()
        self.budget = self.budget_at(step)
        last = step == self.final_step()
        if not last and not (step > self.m.t_init and step % self.m.delta_t == 0):
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


# -- IncreLoRA ------------------------------------------------------------------------------------------------------
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
        _positive_int("init_r", self.init_r)
        _positive_int("target_r", self.target_r)
        _positive_int("top_h", self.top_h)
        _positive_int("add_r", self.add_r)
        if self.incre_interval is not None:
            _positive_int("incre_interval", self.incre_interval)
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

    def controller(self, model: nn.Module, adapter_name: str) -> "IncreLoRAController":
        return IncreLoRAController(self, gated_deltas(model, adapter_name))


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

    def begin(self, model, total_steps, resizable=True):
        super().begin(model, total_steps, resizable)
        if not resizable and self.total_rank() < self.budget:
            raise ValueError("IncreLoRA grows parameters while training, which this setup cannot follow (a DDP "
                             "wrapper that cannot be rebuilt); train with deltatune.train.train, which rebuilds it")
        if not resumed(model) or self.interval is None:  # resumed: the interval chosen at the start stays
            self.interval = self._interval()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "interval": self.interval}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.interval = state.get("interval", self.interval)

    def after_step(self, model, optimizer, step):
        self._check_step(step, need_total=self.m.incre_interval is None)
        self._arm()
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


# -- SoRA -------------------------------------------------------------------------------------------------------------
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
        _positive_int("r", self.r)
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

    def controller(self, model: nn.Module, adapter_name: str) -> "SoRAController":
        return SoRAController(self, gated_deltas(model, adapter_name))


class SoRAController(GatedController):
    def __init__(self, method: SoRA, deltas: dict[str, GatedSVDDelta]):
        super().__init__(deltas, method.total_step)
        self.m = method
        if method.l1_weight > 0:  # d/dg of l1_weight * mean|g|, per matrix
            for d in deltas.values():
                self._add_grad_hook(d, "lam", lambda g: torch.sign(g.detach()) * (method.l1_weight / max(1, g.numel())))

    def after_step(self, model, optimizer, step):
        self._check_step(step, need_total=False)
        self._arm()
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


__all__ = ["AdaLoRA", "AdaLoRAController", "GatedController", "IncreLoRA", "IncreLoRAController", "SoRA",
           "SoRAController", "soft_threshold_", "svd_triplets_init"]
