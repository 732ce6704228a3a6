"""Physically removing or adding components of an SVD-form delta while training.

The delta swaps in new parameters of the new size (:meth:`GatedSVDDelta.keep_` / :meth:`GatedSVDDelta.grow_`).
Everything that referred to the old ones follows here: the optimizer's param groups point at the new tensors,
and what is kept *per entry* is sliced or zero-padded along the component dimension: the gradient, the optimizer
state (Adam's ``exp_avg`` and ``exp_avg_sq``, SGD's ``momentum_buffer``: any state tensor of the parameter's
shape) and any per-entry state a controller keeps (sensitivity EMAs). Removed components take their state with
them; added components start with zero state (new entries in Adam's moments), while per-tensor scalars such as
Adam's step count carry over.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..deltas.gated import COMPONENT_DIMS, GatedSVDDelta

Edit = Callable[[torch.Tensor, int], torch.Tensor]


def _follow(old: nn.Parameter, new: nn.Parameter, dim: int, edit: Edit, optimizer, states: list[dict]) -> None:
    """Move everything attached to ``old`` over to ``new``, edited along ``dim``."""
    if old.grad is not None:
        new.grad = edit(old.grad, dim)
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [new if q is old else q for q in group["params"]]
        if old in optimizer.state:
            state = optimizer.state.pop(old)
            optimizer.state[new] = {k: edit(v, dim) if torch.is_tensor(v) and v.shape == old.shape else v
                                    for k, v in state.items()}
    for d in states:
        if old in d:
            d[new] = edit(d.pop(old), dim)


def _resize(delta: GatedSVDDelta, change: Callable[[], None], edit: Edit, optimizer, states) -> None:
    old = {name: getattr(delta, name) for name in COMPONENT_DIMS}
    change()
    for name, dim in COMPONENT_DIMS.items():
        if isinstance(old[name], nn.Parameter):
            _follow(old[name], getattr(delta, name), dim, edit, optimizer, states or [])


def keep_components_(delta: GatedSVDDelta, index: torch.Tensor, optimizer: torch.optim.Optimizer | None = None,
                     states: list[dict] | None = None) -> None:
    """Keep only components ``index`` of ``delta``; ``states``: extra ``{parameter: per-entry tensor}`` dicts."""
    index = index.to(delta.lam.device)
    _resize(delta, lambda: delta.keep_(index),
            lambda t, dim: t.index_select(dim, index.to(t.device)).contiguous(), optimizer, states)


def grow_components_(delta: GatedSVDDelta, n: int, optimizer: torch.optim.Optimizer | None = None,
                     states: list[dict] | None = None, **init) -> None:
    """Append ``n`` components (see :meth:`GatedSVDDelta.grow_`), zero-padding gradients and per-entry state."""
    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(t.shape)
        shape[dim] = n
        return torch.cat([t, t.new_zeros(shape)], dim=dim)
    _resize(delta, lambda: delta.grow_(n, **init), pad, optimizer, states)
