"""Per-sample conditions: deltas whose update depends on each sample's condition (KIND's class gate), fed from the
batch the way mixed-adapter batches are fed adapter names.

An adapter's method names the model argument that carries the condition (:meth:`Method.condition_key`, e.g.
``class_labels``). On every call of the model a forward pre-hook reads it, from the keyword arguments or the
positional ones by the forward's signature, without taking it away (the model still sees its class labels), and
hands it to that adapter's deltas (their ``condition``). ``model(..., condition=ids)`` gives the condition
explicitly (and is taken out of the call), for models that have no such argument (a task id for a text model).
Every delta then applies its own gate per row: nothing here knows what the condition means.

The condition stays set after the call, so that gradient checkpointing, which reruns layers during the backward,
sees the same one; the next call replaces it, and a call without it clears it (a delta that needs it then says so),
unless :func:`set_condition` holds one: calls that give none then use the held one (``model.generate``, whose
decoding steps cannot carry an extra argument; generation's expanded rows follow their prompt).
"""
from __future__ import annotations

import contextlib
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


def _parameters(model: nn.Module) -> list[str]:
    """The names of the model's forward arguments (empty when its signature cannot be read)."""
    try:
        return list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return []


def _argument(model: nn.Module, key: str, args, kwargs):
    """The value of the model's argument ``key`` in this call (``None`` when it is not given)."""
    if key in kwargs:
        return kwargs[key]
    params = _parameters(model)
    i = params.index(key) if key in params else -1
    return args[i] if 0 <= i < len(args) else None


def as_condition(values) -> torch.Tensor | None:
    if values is None or isinstance(values, torch.Tensor):
        return values
    return torch.as_tensor(values)


class Scope:
    """Whether the conditions the deltas hold are current: a call of the model is running (``depth``), or
    :func:`set_condition` holds one (``held``). Deltas see it as ``_condition_scope`` and refuse to gate outside it
    (a submodule called on its own would otherwise use an earlier call's condition), except in a backward, where
    gradient checkpointing reruns layers."""

    def __init__(self):
        self.depth, self.held = 0, None

    def live(self) -> bool:
        return self.depth > 0 or self.held is not None


def scope(reg) -> Scope:
    return reg.extras.setdefault(SCOPE, Scope())


def _enter(model: nn.Module, args, kwargs):
    reg = model.__dict__.get(REGISTRY_ATTR)
    if reg is None:
        return None
    found = _conditioned(model, reg)
    if not found:
        return None
    # ``condition=`` is ours unless the model itself takes an argument of that name (then it stays the model's)
    explicit = kwargs.pop(EXPLICIT, None) if EXPLICIT in kwargs and EXPLICIT not in _parameters(model) else None
    sc = scope(reg)
    for name, key, layers in found:
        values = explicit if explicit is not None else _argument(model, key, args, kwargs)
        _hand_out(name, layers, values if values is not None else sc.held, sc)
    sc.depth += 1
    return args, kwargs


def _leave(model: nn.Module, args, output=None):
    reg = model.__dict__.get(REGISTRY_ATTR)
    sc = reg.extras.get(SCOPE) if reg is not None else None
    if sc is not None and sc.depth > 0:
        sc.depth -= 1
    return None


def _hand_out(name: str, layers: list, values, sc: Scope | None = None) -> None:
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
        if sc is not None:
            delta.__dict__["_condition_scope"] = sc


#: ``registry.extras`` key of the :class:`Scope`
SCOPE = "condition_scope"


def set_condition(model: nn.Module, values) -> None:
    """Hold a condition for every conditioned adapter (one value per sample): it is set now, and every later call
    that gives none (neither the adapter's argument nor ``condition=``) uses it instead of clearing it, e.g. all
    decoding steps of ``model.generate``; a call that gives one still uses its own. ``None`` lets go of it (and
    clears the deltas' condition)."""
    reg = registry(model)
    found, sc = _conditioned(unwrap(model), reg), scope(reg)
    values = as_condition(values)
    sc.held = None
    for name, _, layers in found:
        _hand_out(name, layers, values, sc)
    if values is not None:
        sc.held = next((layer.deltas[name].condition for name, _, layers in found for layer in layers
                        if name in layer.deltas), values)


def checkpoint_context(model: nn.Module):
    """A ``context_fn`` for non-reentrant gradient checkpointing (``torch.utils.checkpoint.checkpoint(...,
    use_reentrant=False, context_fn=...)``, or ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=
    {"use_reentrant": False, "context_fn": dt.conditioning.checkpoint_context(model)})``): each checkpointed block
    notes the condition of its forward and its rerun in the backward uses that one, not the latest call's. Needed
    when several conditioned forwards run before one backward (two views, a conditional and a null-class pass):
    without it the rerun of the earlier ones sees the last call's condition."""
    model = unwrap(model)

    def context_fn():
        saved: list[tuple[nn.Module, torch.Tensor | None]] = []

        @contextlib.contextmanager
        def forward():
            reg = model.__dict__.get(REGISTRY_ATTR)
            for name, _, layers in (_conditioned(model, reg) if reg is not None else []):
                saved.extend((layer.deltas[name], layer.deltas[name].condition) for layer in layers
                             if name in layer.deltas)
            yield

        @contextlib.contextmanager
        def recompute():
            now = [(d, d.condition) for d, _ in saved]
            for d, values in saved:
                d.condition = values
            try:
                yield
            finally:
                for d, values in now:
                    d.condition = values

        return forward(), recompute()

    return context_fn


HOOK = "conditioning_hook"


def open_hook(model: nn.Module, reg) -> None:
    reg.extras[HOOK] = (model.register_forward_pre_hook(_enter, with_kwargs=True),
                        model.register_forward_hook(_leave, always_call=True))


def close_hook(model: nn.Module, reg) -> None:
    for handle in reg.extras.pop(HOOK, ()):
        handle.remove()


def _forget(model: nn.Module, name: str) -> None:
    reg = model.__dict__.get(REGISTRY_ATTR)
    if reg is not None:
        reg.extras.pop("conditioning", None)
        if not _conditioned(model, reg):
            scope(reg).held = None


ON_CREATE.append(open_hook)
ON_CLOSE.append(close_hook)
ON_DELETE.append(_forget)
