"""The controller driver: ``dt.begin`` / ``dt.after_backward`` / ``dt.step`` run the trainable adapters' controllers.

A controller (:class:`deltatune.methods.Controller`) is built with its adapter's deltas when the adapter is
installed; this module calls its hooks with the step counter kept in the registry. The deltatune trainer, the
Hugging Face callback and a bare loop all drive training through these three verbs (see
:mod:`deltatune.methods.base` for the loop).
"""
from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from .layers import REGISTRY_ATTR, unwrap
from .methods.base import Controller, StepInfo
from .registry import Registry, check_names, registry


def _controllers(model: nn.Module) -> list[Controller]:
    reg = registry(model)
    return [reg.adapters[n].controller for n in reg.training() if reg.adapters[n].controller is not None]


def distributed_wrapper(model: nn.Module) -> str | None:
    """The name of the data-parallel wrapper around ``model`` whose parameters cannot change shape
    (``DistributedDataParallel`` -- what ``accelerate.prepare`` returns in a multi-process run -- or FSDP), or
    ``"torch.distributed"`` when a process group of several ranks is initialized; ``None`` otherwise."""
    import torch.distributed as dist

    fixed = (nn.parallel.DistributedDataParallel,)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        fixed += (FullyShardedDataParallel,)
    except ImportError:  # pragma: no cover
        pass
    m = model
    while m is not None and not hasattr(m, REGISTRY_ATTR):
        if isinstance(m, fixed):
            return type(m).__name__
        m = getattr(m, "module", None)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return "torch.distributed"
    return None


_WARNED_FIXED: set[int] = set()


def begin(model: nn.Module, total_steps: int | None = None, resizable: bool | None = None,
          step: int | None = None) -> None:
    """Call once before training: controllers learn how many optimizer steps follow (schedules such as AdaLoRA's
    need it) and the step counter is set to ``step``: 0 starts afresh (controllers reset their state); a later step
    continues a run (controllers keep the state ``dt.load`` restored). ``None`` (default): the step ``dt.load``
    restored from a checkpoint, if no step has run since, else 0.

    ``resizable=False`` keeps parameter shapes fixed (pruned components are masked instead of removed). Left unset
    it is ``False`` for a model in a ``DistributedDataParallel`` / FSDP wrapper (e.g. from ``accelerate.prepare``)
    or in a multi-rank ``torch.distributed`` run -- a wrapper whose parameters change shape fails at the next
    backward -- and ``True`` otherwise. Pass ``True`` only if you rebuild the wrapper whenever :func:`step` returns
    True (the deltatune trainer does)."""
    reg = registry(model)
    if resizable is None:
        wrapper = distributed_wrapper(model)
        resizable = wrapper is None
        if wrapper is not None and _controllers(model) and id(reg) not in _WARNED_FIXED:
            _WARNED_FIXED.add(id(reg))
            warnings.warn(f"deltatune: the model runs under {wrapper}, whose parameters cannot change shape: "
                          "controllers keep shapes fixed (pruned components are masked, not removed). Pass "
                          "dt.begin(..., resizable=False) to silence this", stacklevel=2)
    reg.step = (reg.step if reg.restored else 0) if step is None else int(step)
    reg.restored = False
    reg.resizable = bool(resizable)
    reg.total_steps = total_steps
    controllers = _controllers(model)
    if controllers and total_steps is not None and reg.step >= total_steps:
        raise ValueError(f"training would continue at step {reg.step} (the adapters' saved step counter), but "
                         f"total_steps={total_steps}: resume with more steps, or start a new schedule with "
                         "dt.begin(model, total_steps, step=0) (or dt.load(..., controller_state=False))")
    for c in controllers:
        c.begin(step_info(reg))


def step_info(reg: Registry, optimizer: torch.optim.Optimizer | None = None, last: bool = True) -> StepInfo:
    """What the controller hooks see. ``optimizer``: this call's, kept on the registry; ``last``: when it is
    ``None``, pass the last one given instead (``dt.step`` passes exactly its own: a step that resizes refuses to
    run without it)."""
    if optimizer is not None:
        reg.optimizer = weakref.ref(optimizer)
    previous = reg.optimizer() if reg.optimizer is not None else None
    return StepInfo(reg.step, reg.total_steps, previous if last else optimizer, reg.resizable)


def after_backward(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """After ``loss.backward()`` (and gradient clipping) and before ``optimizer.step()``, for controllers that act on
    gradients before the update (SORSA's regularizer; the others need only :func:`step`). ``optimizer`` (or the last
    one passed) reaches them as ``StepInfo.optimizer``."""
    info = step_info(registry(model), optimizer)
    for c in _controllers(model):
        c.after_backward(info)


def step(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> bool:
    """Call once per optimizer step, after ``optimizer.step()`` and before ``optimizer.zero_grad()``: controllers
    update importance, masks, ranks or sparsity, and the step counter advances. Returns True when a parameter
    changed shape: the optimizer passed in follows by itself (param groups and per-entry state are moved to the new
    tensors), a ``DistributedDataParallel`` wrapper must be rebuilt (the deltatune trainer does that)."""
    reg = registry(model)
    wrapper = distributed_wrapper(model) if model is not unwrap(model) else None
    if reg.resizable and wrapper not in (None, "torch.distributed") and _controllers(model):
        raise ValueError(f"dt.step got a model in a {wrapper} wrapper, but dt.begin let controllers change parameter "
                         "shapes (resizable=True), which breaks the wrapper at the next backward. Call "
                         "dt.begin(model, total_steps) with resizable unset or False, or pass the inner model to "
                         "dt.step and rebuild the wrapper whenever it returns True")
    changed = False
    info = step_info(reg, optimizer, last=False)
    for c in _controllers(model):
        changed = bool(c.after_step(info)) or changed
    reg.step += 1
    reg.restored = False
    return changed


def controller(model: nn.Module, name: str = "default") -> Controller | None:
    """The controller of adapter ``name`` (``None`` for methods without one): ``controller(...).state_dict()`` is
    what ``dt.save`` stores with the adapter and ``dt.load`` restores."""
    check_names(model, name)
    return registry(model).adapters[name].controller


def saved_state(model: nn.Module, name: str) -> dict:
    """``{"step", "state"}`` of adapter ``name``: the step counter and its controller's :meth:`state_dict` (what
    ``dt.save`` stores with the adapter)."""
    c = controller(model, name)
    return {"step": registry(model).step, "state": c.state_dict() if c is not None else None}


def load_state(model: nn.Module, entries: dict[str, dict | None]) -> None:
    """Hand saved ``{adapter name: {"step", "state"} or None}`` (:func:`saved_state`) to the freshly installed
    adapters' controllers and restore the step counter (``dt.begin`` then continues from it). A malformed entry
    or a state that does not fit raises ``ValueError`` naming the adapter, with the step counter as it was."""
    reg = registry(model)
    saved = [e for e in entries.values() if e is not None]
    for name, e in entries.items():
        if e is not None and not (isinstance(e, dict) and isinstance(e.get("step"), int)
                                  and isinstance(e.get("state") or {}, dict)):
            raise ValueError(f"adapter {name!r}: its config's 'controller' entry must be {{\"step\": int, "
                             "\"state\": {...}}; repair the file or load it with controller_state=False")
    before = reg.step, reg.restored
    try:
        for name, e in entries.items():
            c, state = controller(model, name), (e or {}).get("state")
            if saved:
                reg.step, reg.restored = int(saved[0]["step"]), True
            if c is not None and state:
                try:
                    c.load_state_dict(state)
                except (KeyError, TypeError, ValueError) as err:
                    raise ValueError(f"adapter {name!r}: its saved controller state does not fit ({err}); load it "
                                     "with controller_state=False to start the controller afresh") from None
    except BaseException:
        reg.step, reg.restored = before
        raise


def controller_metrics(model: nn.Module) -> dict[str, float]:
    """What the active adapters' controllers report (e.g. ``budget`` and ``rank``), prefixed by adapter name when
    several adapters have controllers."""
    reg = registry(model)
    named = [(n, reg.adapters[n].controller) for n in reg.training() if reg.adapters[n].controller is not None]
    out: dict[str, float] = {}
    for n, c in named:
        for k, v in c.metrics().items():
            out[k if len(named) == 1 else f"{n}/{k}"] = v
    return out
