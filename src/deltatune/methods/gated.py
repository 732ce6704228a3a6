"""Shared machinery of the adaptive-rank methods on gated SVD triplets (AdaLoRA, IncreLoRA, SoRA).

Every adapted matrix holds ``r`` triplets with gates (:class:`~deltatune.deltas.GatedSVDDelta`)::

    dW = s * P diag(lam * mask) Q          P: out x r,  lam: r,  Q: r x in,  mask in {0, 1}^r

and one controller per adapter (:class:`GatedController`) that, after each optimizer step, scores the triplets by
their smoothed sensitivity (:mod:`deltatune.budget.importance`) and removes or adds triplets in place, moving the
gradients, the optimizer state and the importance state along (:mod:`deltatune.budget.resize`). When shapes must
stay (``StepInfo.resizable`` is False) removed triplets are masked instead (gate zeroed, ``mask = 0``).

Loss terms such as AdaLoRA's orthogonal regularizer ``gamma * R``, ``R = mean ||Q Q^T - I||_F, ||P^T P - I||_F``,
enter the gradients during backward through gradient hooks, once per optimizer step (right after the first
backward of the step accumulates into the tensor), whatever the model returns, under DDP and gradient
accumulation alike. (Under fp16 loss scaling the hooks would add an unscaled term to scaled gradients, which the
scaler then divides away: use bf16 or fp32 with such terms.) Under ``torch.distributed`` every decision is made
from rank 0's scores, so all ranks prune and grow alike.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..budget import (
    Sensitivity,
    broadcast_,
    keep_components_,
    orthogonality,
    orthogonality_grad,
    triplet_scores,
)
from ..deltas import Delta, GatedSVDDelta
from ..sharding import full, is_sharded, zero_where_
from .base import Controller, StepInfo

INIT_STD = 0.02


def int_at_least(name: str, value, minimum: int = 1) -> None:
    """Refuse ``value`` unless it is an integer ``>= minimum`` (``ValueError`` naming the field)."""
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def svd_triplets_init(delta: GatedSVDDelta, std: float = INIT_STD) -> GatedSVDDelta:
    """AdaLoRA's init: ``lam = 0``, ``P, Q ~ N(0, std^2)`` (so ``dW = 0``)."""
    with torch.no_grad():
        nn.init.normal_(delta.P, std=std)
        nn.init.normal_(delta.Q, std=std)
        delta.lam.zero_()
    return delta


def gated_deltas(deltas: dict[str, Delta]) -> dict[str, GatedSVDDelta]:
    """The gated-SVD deltas among an adapter's ``{module name: delta}`` (its ``modules_to_save`` entries left
    out)."""
    return {k: d for k, d in deltas.items() if isinstance(d, GatedSVDDelta)}


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

    def after_backward(self, info: StepInfo) -> None:
        """FSDP2: hooks on a sharded parameter never fire (FSDP writes the reduce-scattered gradient into ``.grad``
        itself), so the loss terms of sharded parameters are added here, after the backward pass (and after any
        gradient clipping) instead; a no-op for unsharded parameters, whose hooks already ran."""
        for (_, attr), (d, hook, _) in list(self._hooks.items()):
            p = getattr(d, attr)
            if is_sharded(p):
                if p not in self._due:  # dt.begin ran before fully_shard replaced the parameters
                    self._arm()
                hook(p)

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
    def begin(self, info: StepInfo) -> None:
        total_steps = info.total_steps
        if self.configured_total is None:
            self.total = total_steps if total_steps is not None or not info.resumed else self.total
        elif total_steps is not None and total_steps > self.configured_total:
            raise ValueError(f"the method was configured with total_step={self.configured_total}, but training runs "
                             f"{total_steps} optimizer steps; set total_step={total_steps} (or leave it unset)")
        elif total_steps is not None and total_steps < self.configured_total:
            warnings.warn(f"the method was configured with total_step={self.configured_total}, but training runs "
                          f"only {total_steps} optimizer steps: the schedule will not finish (no final pattern, no "
                          "pruning at the end); leave total_step unset to follow the run", stacklevel=3)
        self.resizable = info.resizable
        if not info.resumed:
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
        # FSDP2: the scores of sharded P / lam / Q are gathered (every rank calls dt.step), the budget is global
        scores = [triplet_scores(full(self.sens.score(d.P)), full(self.sens.score(d.lam)), full(self.sens.score(d.Q)))
                  for d in self.deltas.values()]
        broadcast_(scores)
        for sc, d in zip(scores, self.deltas.values()):  # masked-off components never take a place in the budget
            sc.masked_fill_(d.mask == 0, float("-inf"))
        return scores

    @staticmethod
    def _mask_out(delta: GatedSVDDelta, keep: torch.Tensor) -> None:
        """Switch the triplets not in ``keep`` off for good (gate zeroed, mask 0), keeping shapes."""
        zero_where_(delta.lam, ~keep)
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


__all__ = ["GatedController", "INIT_STD", "gated_deltas", "int_at_least", "svd_triplets_init"]
