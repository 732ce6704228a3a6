"""Per-sample conditions: deltas whose update depends on each sample's condition (KIND's class gate), fed from the
batch the way mixed-adapter batches are fed adapter names.

An adapter's method names the model argument that carries the condition (:meth:`Method.condition_key`, e.g.
``class_labels``). On every call of the model a forward pre-hook reads it, from the keyword arguments or the
positional ones by the forward's signature, without taking it away (the model still sees its class labels), and
hands it to that adapter's deltas (their ``condition``). ``model(..., condition=ids)`` gives the condition
explicitly (and is taken out of the call), for models that have no such argument (a task id for a text model).
Every delta then applies its own gate per row: nothing here knows what the condition means.

The condition stays set after the call, so that gradient checkpointing, which reruns layers during the backward,
sees the same one; the next call replaces it, and a call without it clears it (a delta that needs it then says so).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from .layers import REGISTRY_ATTR, unwrap
from .registry import ON_CLOSE, ON_CREATE, ON_DELETE, adapted_layers, registry

EXPLICIT = "condition"


def _conditioned(model: nn.Module, reg) -> list[tuple[str, str, list]]:
    """``[(adapter, argument, [layers])]`` of the adapters that take a condition (cached until adapters change)."""
    keys = {name: info.method.condition_key() for name, info in reg.adapters.items()}
    keys = {n: k for n, k in keys.items() if k is not None}
    cache = reg.extras.get("conditioning")
    if cache is None or cache[0] != tuple(keys.items()):
        layers = list(adapted_layers(model)) if keys else []
        found = [(n, k, [layer for _, layer in layers if n in layer.deltas]) for n, k in keys.items()]
        cache = reg.extras["conditioning"] = (tuple(keys.items()), found)
    return cache[1]


def _argument(model: nn.Module, key: str, args, kwargs):
    """The value of the model's argument ``key`` in this call (``None`` when it is not given)."""
    if key in kwargs:
        return kwargs[key]
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return None
    i = params.index(key) if key in params else -1
    return args[i] if 0 <= i < len(args) else None


def as_condition(values) -> torch.Tensor | None:
    if values is None or isinstance(values, torch.Tensor):
        return values
    return torch.as_tensor(values)


def _enter(model: nn.Module, args, kwargs):
    reg = model.__dict__.get(REGISTRY_ATTR)
    if reg is None:
        return None
    found = _conditioned(model, reg)
    if not found:
        return None
    explicit = kwargs.pop(EXPLICIT, None)
    for name, key, layers in found:
        _hand_out(name, layers, explicit if explicit is not None else _argument(model, key, args, kwargs))
    return args, kwargs


def _hand_out(name: str, layers: list, values) -> None:
    """Give adapter ``name``'s deltas on ``layers`` the condition ``values`` (checked once, by the first delta's
    :meth:`condition_values`); ``None`` clears it."""
    values, checked = as_condition(values), False
    for layer in layers:
        if name not in layer.deltas:
            continue
        delta = layer.deltas[name]
        if values is not None and not checked:
            values, checked = delta.condition_values(values), True
        delta.condition = values


def set_condition(model: nn.Module, values) -> None:
    """Set the condition of every conditioned adapter by hand (what the hook does on each call; ``None`` clears
    it)."""
    reg = registry(model)
    for name, _, layers in _conditioned(unwrap(model), reg):
        _hand_out(name, layers, values)


HOOK = "conditioning_hook"


def open_hook(model: nn.Module, reg) -> None:
    reg.extras[HOOK] = model.register_forward_pre_hook(_enter, with_kwargs=True)


def close_hook(model: nn.Module, reg) -> None:
    handle = reg.extras.pop(HOOK, None)
    if handle is not None:
        handle.remove()


def _forget(model: nn.Module, name: str) -> None:
    reg = model.__dict__.get(REGISTRY_ATTR)
    if reg is not None:
        reg.extras.pop("conditioning", None)


ON_CREATE.append(open_hook)
ON_CLOSE.append(close_hook)
ON_DELETE.append(_forget)
