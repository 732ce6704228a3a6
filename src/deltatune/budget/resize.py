"""Physically removing or adding components of a delta while training.

Any delta with a ``component_dims`` map (tensor name -> the dimension that indexes components) and in-place
``keep_(index)`` / ``grow_(n, **init)`` methods that swap in new parameters of the new size can be resized
(:class:`~deltatune.deltas.GatedSVDDelta` is one). Everything that referred to the old parameters follows here:
the optimizer's param groups point at the new tensors, and what is kept *per entry* is sliced or padded along the
component dimension: the gradient, the optimizer state (Adam's ``exp_avg`` and ``exp_avg_sq``, SGD's
``momentum_buffer``: any state tensor of the parameter's shape) and any per-entry state a controller keeps
(sensitivity EMAs). Removed components take their state with them. Added components get zero first moments; their
second moments (state keys ending in ``_sq``) start at the mean of the existing entries, because Adam's step count
is per tensor: with a zero second moment and an old step count, bias correction would give the new entries several
times the learning rate for hundreds of steps. Optimizer state of any other shape (factored or blockwise moments)
cannot be resized and raises.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..deltas import Delta

Edit = Callable[[torch.Tensor, int, str], torch.Tensor]


def _follow(old: nn.Parameter, new: nn.Parameter, dim: int, edit: Edit, optimizer, states: list[dict]) -> None:
    """Move everything attached to ``old`` over to ``new``, edited along ``dim``."""
    if old.grad is not None:
        new.grad = edit(old.grad, dim, "grad")
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [new if q is old else q for q in group["params"]]
        if old in optimizer.state:
            state = optimizer.state.pop(old)
            optimizer.state[new] = {k: edit(v, dim, k) if torch.is_tensor(v) and v.dim() else v
                                    for k, v in state.items()}
    for d in states:
        if old in d:
            d[new] = edit(d.pop(old), dim, "state")


def _check_state(delta: Delta, optimizer) -> dict[str, nn.Parameter]:
    """The delta's resizable parameters; raise before anything changes if their optimizer state cannot follow."""
    params = {n: getattr(delta, n) for n in delta.component_dims if isinstance(getattr(delta, n), nn.Parameter)}
    for name, p in params.items():
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        for k, v in state.items():
            if torch.is_tensor(v) and v.dim() and v.shape != p.shape:
                raise ValueError(f"cannot resize {name}: the optimizer keeps state {k!r} of shape {tuple(v.shape)} "
                                 f"for a parameter of shape {tuple(p.shape)} (factored or blockwise state); use an "
                                 "optimizer with per-entry state such as AdamW or SGD, or shrink='never'")
    return params


def _resize(delta: Delta, change: Callable[[], None], edit: Edit, optimizer, states) -> None:
    old = _check_state(delta, optimizer)
    change()
    for name, p in old.items():
        _follow(p, getattr(delta, name), delta.component_dims[name], edit, optimizer, states or [])


def keep_components_(delta: Delta, index: torch.Tensor, optimizer: torch.optim.Optimizer | None = None,
                     states: list[dict] | None = None) -> None:
    """Keep only components ``index`` of ``delta``; ``states``: extra ``{parameter: per-entry tensor}`` dicts."""
    _resize(delta, lambda: delta.keep_(index),
            lambda t, dim, _: t.index_select(dim, index.to(t.device)).contiguous(), optimizer, states)


def grow_components_(delta: Delta, n: int, optimizer: torch.optim.Optimizer | None = None,
                     states: list[dict] | None = None, **init) -> None:
    """Append ``n`` components (see :meth:`GatedSVDDelta.grow_`); gradients and per-entry state are padded with
    zeros, second moments (``*_sq``) with the mean of the existing entries."""
    def pad(t: torch.Tensor, dim: int, key: str) -> torch.Tensor:
        shape = list(t.shape)
        shape[dim] = n
        fill = t.mean() if key.endswith("_sq") and t.numel() else 0.0
        return torch.cat([t, t.new_full(shape, float(fill))], dim=dim)
    _resize(delta, lambda: delta.grow_(n, **init), pad, optimizer, states)


def reset_entries_(param: nn.Parameter, positions: torch.Tensor,
                   optimizer: torch.optim.Optimizer | None = None) -> None:
    """Entries ``positions`` of ``param`` (flat) start afresh: their gradient and every per-entry optimizer state
    (Adam's moments, SGD's momentum) are zeroed. Other state shapes cannot be reset entry-wise and raise."""
    with torch.no_grad():
        tensors = [param.grad] if param.grad is not None else []
        state = optimizer.state.get(param, {}) if optimizer is not None else {}
        for k, v in state.items():
            if torch.is_tensor(v) and v.dim():
                if v.shape != param.shape:
                    raise ValueError(f"cannot reset entries: the optimizer keeps state {k!r} of shape "
                                     f"{tuple(v.shape)} for a parameter of shape {tuple(param.shape)}; use an "
                                     "optimizer with per-entry state such as AdamW or SGD")
                tensors.append(v)
        for t in tensors:
            t.view(-1).index_fill_(0, positions.to(t.device), 0)
