"""The public verbs on adapted models: attach, switch, merge, unmerge, unload, delete, inspect.

Everything here is generic: it uses the :class:`~deltatune.deltas.Delta` and :class:`~deltatune.methods.Method`
interfaces, the layer wrapper (:mod:`deltatune.adapted`) and the registry (:mod:`deltatune.registry`). Plugins such
as serving hear about changes through the registry's listeners; this module never imports them.
"""
from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from .adapted import AdaptedLayer
from .checks import finite_number, finite_tensor
from .deltas import Delta
from .layers import BaseView, base_bias, base_modules, linear_weight, set_submodule, unwrap
from .methods.base import Method, check_fields, full_replacement
from .sharding import refuse_sharded
from .registry import (BEFORE_SWITCH, ON_DELETE, AdapterInfo, adapted_layers, adapter_names, check_install,
                       check_names, check_new_name, close, notify, registry, sync)
from .targets import resolve_targets


# -- public verbs --------------------------------------------------------------------------------------------------
def attach(model: nn.Module, method: Method, name: str = "default", activate: bool = True,
           data: Iterable | None = None) -> nn.Module:
    """Add adapter ``name`` built by ``method`` to ``model`` (in place) and return the model.

    The base model's parameters are frozen. With ``activate=True`` (default) the new adapter becomes the only
    active (and trainable) one; otherwise the active set is unchanged. ``data``: calibration batches for
    data-aware initializers (e.g. ``dt.S2FT(selection="gradient")``); each batch is a dict of model keyword
    arguments (with ``labels`` where a loss is needed) or a tensor of input ids. On any error the model is left
    untouched.
    """
    if not isinstance(method, Method):
        raise TypeError(f"expected a method config such as dt.LoRA(r=8), got {type(method).__name__}")
    check_new_name(model, name)
    check_fields(method)
    method.validate()
    check_install(model, name, activate)
    refuse_sharded(model, f"attach adapter {name!r}", ATTACH_BEFORE_SHARDING)
    model = unwrap(model)

    view = BaseView(model)
    saved = resolve_targets(view, method.modules_to_save) \
        if method.modules_to_save else []
    targets = resolve_targets(view, method.targets, method.exclude, skip=saved, layers=method.layers)
    modules = dict(base_modules(model))

    def weights(mod_name: str):
        base = modules[mod_name]
        return linear_weight(base), base_bias(base)

    # build everything first: nothing changes on error
    built: dict[str, Delta] = method.build_all(model, {n: weights(n) for n in targets}, data)
    stray = sorted(set(built) - set(targets))
    if stray:
        raise RuntimeError(f"{type(method).__name__}.build_all returned deltas for non-target modules {stray[:3]}")
    if not built:
        raise ValueError(f"{type(method).__name__} selected no module to adapt among {len(targets)} targets; raise "
                         "its ratio or density")
    built.update({n: full_replacement(*weights(n)) for n in saved})
    for mod_name, delta in built.items():  # e.g. an SVD init of a base weight that holds NaN
        for k, t in delta.tensors().items():
            finite_tensor(t, f"{type(method).__name__} built {mod_name}.{k}, which",
                          hint="is the base weight finite? (the model was not changed)")
    install(model, name, method, built, activate)
    registry(model).restored = False  # a new adapter starts a new run: dt.begin counts from 0 again
    return model


def install(model: nn.Module, name: str, method: Method, built: dict[str, Delta], activate: bool = True) -> None:
    """Put already-built deltas ``{module name: delta}`` on the model as adapter ``name`` (used by attach and load).

    The caller has checked that every delta fits its module; this step cannot fail half-way.
    """
    check_install(model, name, activate)
    model = unwrap(model)
    reg = registry(model, create=True)
    if not reg.adapters:
        for p in model.parameters():
            p.requires_grad_(False)
    for mod_name, delta in built.items():
        layer = model.get_submodule(mod_name)
        if not isinstance(layer, AdaptedLayer):
            layer = AdaptedLayer(layer)
            set_submodule(model, mod_name, layer)
        layer.add(name, delta)
    reg.adapters[name] = AdapterInfo(method, list(built))
    # the controller receives this adapter's deltas (in module order) and never looks them up itself
    reg.adapters[name].controller = method.controller(deltas(model, name), model)
    if activate or not reg.active:
        reg.active, reg.trainable = [name], None
    sync(model)


def adapters(model: nn.Module) -> list[str]:
    """Names of the attached adapters, in attach order."""
    return adapter_names(model)


def active_adapters(model: nn.Module) -> list[str]:
    return list(registry(model).active)


def set_active(model: nn.Module, names: str | Iterable[str],
               trainable: str | Iterable[str] | None = None) -> nn.Module:
    """Make ``names`` (one or several; their outputs add) the active adapters. Only they get gradients, or only
    ``trainable`` among them: ``dt.set_active(model, ["lang", "task"], trainable="task")`` trains a task adapter on
    top of a frozen language adapter (composable sparse fine-tuning); controllers run for trainable adapters."""
    names = check_names(model, names)
    reg = registry(model)
    if trainable is not None:
        trainable = check_names(model, trainable)
        extra = [n for n in trainable if n not in names]
        if extra:
            raise ValueError(f"trainable adapters {extra} are not among the active ones {names}")
    notify(BEFORE_SWITCH, unwrap(model))  # e.g. serving takes out an adapter it merged for single-adapter batches
    for _, layer in adapted_layers(model):
        stale = [n for n in layer.merged if n not in names]
        if stale:
            raise ValueError(f"adapters {stale} are merged into the weights; dt.unmerge(model) before switching")
    reg.active, reg.trainable = names, trainable
    sync(model)
    return model


@contextlib.contextmanager
def override_active(model: nn.Module, names: Iterable[str]):
    """Inside the block every adapted layer applies only ``names`` (none: the plain base), whatever the registry's
    active adapters are (``dt.set_active`` inside the block changes what applies after it); the registry's sets
    and gradient flags stay as they are. Shared by :func:`disabled`, serving (single-adapter batches) and
    interference measurements; blocks nest."""
    names = tuple(names)
    saved = [(layer, layer.override) for _, layer in adapted_layers(model)]
    for layer, _ in saved:
        layer.override = names
        layer.refresh()
    try:
        yield model
    finally:
        for layer, before in saved:
            layer.override = before
            layer.refresh()


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Run the plain base model inside the block (merged adapters are unmerged and re-merged after)."""
    layers = [layer for _, layer in adapted_layers(model)]
    merged = {id(layer): dict(layer.merged) for layer in layers}
    for layer in layers:
        for n in reversed(merged[id(layer)]):
            layer.unmerge(n)
    try:
        with override_active(model, ()):
            yield model
    finally:
        for layer in layers:
            for n, w in merged[id(layer)].items():
                layer.merge(n, w)
            layer.refresh()


def _untie(model: nn.Module, layers: list[AdaptedLayer]) -> None:
    """Give each layer about to be merged its own weight if the weight is shared (tied input/output embeddings),
    so that merging a delta into one module does not silently change the other."""
    count: dict[int, int] = {}
    for _, p in unwrap(model).named_parameters(remove_duplicate=False):
        count[id(p)] = count.get(id(p), 0) + 1
    for layer in layers:
        w = getattr(layer.base, "weight", None)  # None: a layer without one (e.g. HQQ's), which refuses merging
        if w is not None and count.get(id(w), 0) > 1:
            warnings.warn(f"untying a shared weight of shape {tuple(w.shape)} before merging into it (tied "
                          "embeddings); the other module keeps the original values", stacklevel=3)
            layer.base.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)


#: what to do instead of attaching, loading or merging on an FSDP2-sharded model (see deltatune.sharding)
ATTACH_BEFORE_SHARDING = ("Attach or dt.load adapters before fully_shard, then shard: the adapters' parameters are "
                          "sharded with the base and FSDP sees them from the start")
MERGE_UNSHARDED = ("Merge on an unsharded model: dt.save the adapter (it gathers the shards), dt.load it onto the "
                   "base model in one process and dt.merge there")


def merge_layers(model: nn.Module, names: list[str], weights: dict[str, float] | None = None) -> None:
    """Merge the not yet merged ``names`` on every layer; all or nothing (a refused layer takes the others out)."""
    refuse_sharded(model, f"merge adapters {names}", MERGE_UNSHARDED)
    todo = [layer for _, layer in adapted_layers(model) if any(n in layer.deltas and n not in layer.merged
                                                              for n in names)]
    _untie(model, todo)
    done: list[tuple[AdaptedLayer, str]] = []
    try:
        for layer in todo:
            # deltas that act on the current weight first: W R^T + dW is what the layer computes while both are live
            for n in sorted(names, key=lambda n: not (n in layer.deltas and layer.deltas[n].acts_on_weight)):
                if n in layer.deltas and n not in layer.merged:
                    layer.merge(n, (weights or {}).get(n, 1.0))
                    done.append((layer, n))
    except BaseException:
        for layer, n in reversed(done):
            layer.unmerge(n)
        raise


def merge(model: nn.Module, names: str | Iterable[str] | None = None,
          weights: float | Iterable[float] | dict[str, float] | None = None) -> nn.Module:
    """Merge the adapters into the base weights, exactly (default: the active adapters).

    ``W <- W + sum_i weights_i dW_i``: the weighted sum that Orthogonal Adaptation and task arithmetic use (the
    paper's ``lambda``; 1 by default). ``weights``: one number for all, one per name, or ``{name: weight}``. A
    rotation (OFT) multiplies instead, ``W <- W R^T``, and a weight ``w`` merges the rotation of ``w q``.
    :func:`unmerge` subtracts exactly what was merged."""
    names = check_names(model, registry(model).active if names is None else names)
    if weights is None or isinstance(weights, dict):
        table = {n: finite_number(w, f"merge weight of {n!r}") for n, w in (weights or {}).items()}
    elif isinstance(weights, (numbers.Real, torch.Tensor, str)):  # one number (a str is refused by name)
        table = {n: finite_number(weights, "merge weight") for n in names}
    else:
        weights = [finite_number(w, f"merge weight {i}") for i, w in enumerate(weights)]
        if len(weights) != len(names):
            raise ValueError(f"got {len(weights)} merge weights for {len(names)} adapters {names}")
        table = dict(zip(names, weights))
    stray = sorted(set(table) - set(names))
    if stray:
        raise ValueError(f"merge weights given for adapters {stray} that are not being merged ({names})")
    for _, layer in adapted_layers(model):  # before any layer changes
        for n in names:
            layer.check_remerge(n, table.get(n, 1.0))
    merge_layers(model, names, table)
    return model


def unmerge(model: nn.Module, names: str | Iterable[str] | None = None) -> nn.Module:
    """Subtract merged adapters from the base weights again (default: all merged adapters)."""
    refuse_sharded(model, "unmerge adapters", MERGE_UNSHARDED)
    for _, layer in adapted_layers(model):
        for n in list(reversed(layer.merged)) if names is None else check_names(model, names):
            layer.unmerge(n)
    return model


def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Remove every adapter and return the plain model; with ``merge=True`` the active adapters stay merged in."""
    model = unwrap(model)
    reg = registry(model)  # a model without adapters is refused with a clear ValueError
    keep = reg.active if merge else []
    for _, layer in adapted_layers(model):
        for n in list(reversed(layer.merged)):
            if n not in keep:
                layer.unmerge(n)
    merge_layers(model, keep)
    for name, layer in list(adapted_layers(model)):
        set_submodule(model, name, layer.base)
    close(model)
    return model


def delete(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` (unmerged first if needed); layers left without deltas are unwrapped."""
    check_names(model, name)
    model = unwrap(model)
    reg = registry(model)
    for mod_name, layer in list(adapted_layers(model)):
        if name not in layer.deltas:
            continue
        layer.remove(name)
        if not len(layer.deltas):
            set_submodule(model, mod_name, layer.base)
    del reg.adapters[name]
    notify(ON_DELETE, model, name)
    reg.active = [n for n in reg.active if n != name] or list(reg.adapters)[-1:]
    if reg.trainable is not None:
        reg.trainable = [n for n in reg.trainable if n != name] or None
    if not reg.adapters:
        close(model)
        return model
    sync(model)
    return model


def deltas(model: nn.Module, name: str) -> dict[str, Delta]:
    """``{module name: delta}`` of adapter ``name``."""
    check_names(model, name)
    return {mod: layer.deltas[name] for mod, layer in adapted_layers(model) if name in layer.deltas}


def method_of(model: nn.Module, name: str) -> Method:
    check_names(model, name)
    return registry(model).adapters[name].method


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (each shared tensor counted once)."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in unwrap(model).parameters()}
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, sum(p.numel() for p in seen.values())


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print ``trainable params: X || all params: Y || trainable%: Z`` (PEFT's line; all params include the
    adapters') and return ``(trainable, all)`` from :func:`trainable_parameters`."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / max(total, 1):.4f}")
    return trainable, total
