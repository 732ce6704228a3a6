"""The adapter registry of one model, and the listeners through which plugins hear about it.

Per adapted model: the adapters by name (in attach order, each with its method and controller), the active ones,
which of those train, and the controllers' step counter. Nothing here knows about serving or Hugging Face: such
plugins register listeners (module-level lists below) and keep their own per-model state in ``Registry.extras``.

- :data:`ON_CREATE` ``(model, registry)``: a model gets its first adapter;
- :data:`ON_CLOSE` ``(model, registry)``: a model loses its last adapter (``dt.unload``, ``dt.delete``);
- :data:`BEFORE_SWITCH` ``(model)``: the active adapters are about to change (``dt.set_active``);
- :data:`ON_DELETE` ``(model, name)``: adapter ``name`` was removed.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .adapted import AdaptedLayer
from .layers import REGISTRY_ATTR, unwrap
from .methods.base import Controller, Method

_NAME_RE = re.compile(r"[A-Za-z0-9_\-]+")  # fullmatch: "$" would let a trailing newline through

ON_CREATE: list[Callable] = []
ON_CLOSE: list[Callable] = []
BEFORE_SWITCH: list[Callable] = []
ON_DELETE: list[Callable] = []


@dataclass
class AdapterInfo:
    method: Method
    modules: list[str]
    controller: Controller | None = None


@dataclass
class Registry:
    """Per-model state: adapters by name (in attach order), the active ones, which of those train (``None``: all
    active ones), the controllers' step counter and what :func:`deltatune.control.begin` decided."""

    adapters: dict[str, AdapterInfo] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    trainable: list[str] | None = None
    step: int = 0
    restored: bool = False  # ``step`` came from a checkpoint (dt.load) and no training step has run since
    resizable: bool = True  # what dt.begin decided: controllers may change parameter shapes
    total_steps: int | None = None  # what dt.begin was told
    #: a weak reference to the last optimizer passed to dt.step / dt.after_backward (the model must not keep it
    #: and its state alive after training)
    optimizer: Any = None
    #: per-model state of plugins (serving), by plugin name; dropped with the registry
    extras: dict[str, Any] = field(default_factory=dict)

    def training(self) -> list[str]:
        """The active adapters whose parameters train."""
        return list(self.active) if self.trainable is None else [n for n in self.active if n in self.trainable]


def registry(model: nn.Module, create: bool = False) -> Registry:
    """The model's registry; ``create=True`` makes one (and tells :data:`ON_CREATE`) if there is none."""
    model = unwrap(model)
    reg = model.__dict__.get(REGISTRY_ATTR)
    if reg is None:
        if not create:
            raise ValueError("this model has no deltatune adapters; attach one first with dt.attach(model, dt.LoRA())")
        reg = model.__dict__[REGISTRY_ATTR] = Registry()
        for listener in ON_CREATE:
            listener(model, reg)
    return reg


def close(model: nn.Module) -> None:
    """Drop the registry of a model that has no adapters any more (and tell :data:`ON_CLOSE`)."""
    model = unwrap(model)
    reg = model.__dict__.pop(REGISTRY_ATTR)
    for listener in ON_CLOSE:
        listener(model, reg)


def notify(listeners: list[Callable], *args) -> None:
    for listener in listeners:
        listener(*args)


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the attached adapters, in attach order (none for a model without a registry)."""
    reg = unwrap(model).__dict__.get(REGISTRY_ATTR)
    return list(reg.adapters) if reg else []


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    for name, module in unwrap(model).named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def sync(model: nn.Module) -> None:
    """Push the registry's active list to every layer; ``requires_grad`` only on trainable adapters' parameters."""
    reg = registry(model)
    training = set(reg.training())
    for _, layer in adapted_layers(model):
        layer.active = tuple(reg.active)
        layer.refresh()
        for name, delta in layer.deltas.items():
            for p in delta.parameters():
                p.requires_grad_(name in training)


def check_names(model: nn.Module, names: str | Iterable[str]) -> list[str]:
    """``names`` as a list; ``ValueError`` for a name that is not attached."""
    reg = registry(model)
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in reg.adapters:
            raise ValueError(f"no adapter named {n!r}; attached adapters: {list(reg.adapters)}")
    return names


def check_install(model: nn.Module, name: str, activate: bool) -> None:
    """Whether adapter ``name`` may be added (``dt.attach``, ``dt.load``, combining): the name is valid and free,
    and it may become the only active adapter only while no other adapter is merged into the weights (they would
    stay applied but inactive, and nothing could take them out consistently). Refuses saying what to do."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name == "base":
        raise ValueError(f"adapter name {name!r} must be letters, digits, '_' or '-' (and not 'base')")
    if name in adapter_names(model):
        raise ValueError(f"an adapter named {name!r} is already attached; pick another name or dt.delete() it first")
    merged = sorted({n for _, layer in adapted_layers(model) for n in layer.merged})
    if activate and merged:
        raise ValueError(f"adapters {merged} are merged into the weights; making {name!r} the only active adapter "
                         f"would leave them applied but inactive. dt.unmerge(model) first, or pass activate=False")


def check_new_name(model: nn.Module, name: str) -> None:
    """The name check of :func:`check_install` alone (for an adapter that does not become active)."""
    check_install(model, name, activate=False)
