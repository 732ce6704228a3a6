"""Attach deltas to any ``nn.Module``: the adapted-layer wrapper, the adapter registry and the public verbs.

A targeted layer ``m`` is replaced by ``AdaptedLayer(base=m)`` that holds one delta per adapter name::

    y = base(x) + sum over active, unmerged adapters a of  delta_a(x)

Everything here is generic: it only uses the :class:`~deltatune.deltas.Delta` and
:class:`~deltatune.methods.Method` interfaces.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import re
import types
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .checks import finite_number, finite_tensor
from .deltas import Delta
from .methods.base import Controller, Method, StepInfo, check_fields, full_replacement
from .layers import (REGISTRY_ATTR, BaseView, LayerWrapper, base_bias, base_modules, hooked,
                     kind_of, linear_weight, set_submodule, unwrap)
from .layers import base_parameter_count  # noqa: F401  (re-exported: dt.model.base_parameter_count)
from .targets import resolve_targets
_NAME_RE = re.compile(r"[A-Za-z0-9_\-]+")  # fullmatch: "$" would let a trailing newline through


class AdaptedLayer(LayerWrapper):
    """A frozen layer plus named deltas. ``y = base(x) + sum_a delta_a(x)`` over active, unmerged adapters."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.layer_kind = kind_of(base)
        self.kind = self.layer_kind.name
        self.deltas = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: dict[str, float] = {}  # merged adapters in merge order, with the weight each was merged with
        self._undo: dict[str, tuple] = {}  # per merged adapter: what its inverse update would not restore exactly
        self.enabled = True
        self._live: tuple[Delta, ...] = ()
        # the delta that computes the whole output, if any: a plain reference, never a registered submodule (it is
        # already registered under ``deltas``; a second registration puts its tensors twice into ``state_dict``)
        self.__dict__["_replacing"] = None
        self._rows = None  # a deltatune.serving.Rows while a mixed-adapter batch runs
        # exactly nn.Linear / Conv1D (not quantized or other subclasses): its output is x W^T + b, so it may run
        # on 2-D inputs and a single live delta may compute the whole layer in one fused node (Delta.fuse)
        self._plain = self.layer_kind.fusable(base)

    # the wrapped layer still looks like its base to code that reads its attributes
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self):
        return getattr(self.base, "bias", None)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)

    def linear_weight(self) -> torch.Tensor:
        return self.layer_kind.weight(self.base)

    def base_bias(self) -> torch.Tensor | None:
        """The bias a delta may update (``None`` for kinds without one, e.g. embeddings)."""
        return self.bias if self.layer_kind.has_bias else None

    def add(self, name: str, delta: Delta) -> None:
        w = self.linear_weight()
        if (delta.out_features, delta.in_features) != tuple(w.shape):
            raise ValueError(f"delta of shape ({delta.out_features}, {delta.in_features}) does not fit a weight of "
                             f"shape {tuple(w.shape)}")
        delta.bind(self)
        self.deltas[name] = delta
        self.__dict__.pop("_plan_cache", None)  # mixed-batch factor stacks (deltatune.serving)
        self.refresh()

    def refresh(self) -> None:
        """Recompute the tuple of deltas the forward applies (kept out of the hot path)."""
        live = [self.deltas[n] for n in self.active if n in self.deltas and n not in self.merged]
        live = live if self.enabled else []
        replacing = [d for d in live if d.replaces_output]
        # one replacing delta computes the whole output; several fall back to adding their dense updates
        self.__dict__["_replacing"] = replacing[0] if len(replacing) == 1 and not self.merged else None
        self._live = tuple(d for d in live if d is not self._replacing)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._rows is not None:
            return self._rows.forward(self, x, *args, **kwargs)
        if not self._plain or hooked(self.base):
            # hooks and Linear subclasses see the layer as its callers do: original shapes, outputs left untouched
            out = self._base_output(x, *args, **kwargs)
            for d in self._live:
                out = self.layer_kind.add(d, out, x)
            return out
        # a plain linear map acts on the last dim: run it on a 2-D (tokens x features) view, so that its output
        # is a fresh tensor (not a view) that deltas can add into in place
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        if len(self._live) == 1 and self._replacing is None:
            out = self._live[0].fuse(x, self.linear_weight(), self.bias)
            if out is not None:
                return out.view(*lead, out.shape[-1])
        out = self._base_output(x, *args, **kwargs)
        for d in self._live:
            out = d.add_to(out, x)
        return out.view(*lead, out.shape[-1])

    def _base_output(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._replacing is not None:
            return self.layer_kind.replace(self._replacing, x)
        return self.base(x, *args, **kwargs)

    def merge(self, name: str, weight: float = 1.0) -> None:
        """``W <- W + weight * dW_name`` (a multiplicative delta: ``W <- W R(weight q)^T``), exactly."""
        weight = finite_number(weight, "merge weight")
        self.check_remerge(name, weight)
        if name in self.merged or name not in self.deltas:
            return
        delta = self.deltas[name]
        rotating = [n for n in self.active if n in self.deltas and n not in self.merged and n != name
                    and self.deltas[n].multiplicative] if self.enabled else []
        if rotating and not delta.multiplicative:
            raise ValueError(f"cannot merge {name!r} while {rotating[0]!r} is live on the same layer: it multiplies "
                             "the layer's current weight, so it would then act on the merged update too and the "
                             f"output would change. Merge {rotating[0]!r} first (dt.merge merges in the order given) "
                             "or deactivate it")
        self._put_in(name, weight)
        self.merged[name] = weight
        self.refresh()

    def check_remerge(self, name: str, weight: float) -> None:
        """Merging an adapter again with the weight it is merged with does nothing; with another weight it is
        refused (not ignored)."""
        if name in self.merged and self.merged[name] != weight:
            raise ValueError(f"adapter {name!r} is already merged with weight {self.merged[name]}; "
                             f"dt.unmerge(model, {name!r}) first to merge it with weight {weight}")

    def unmerge(self, name: str) -> None:
        """Take ``name`` out of the weights exactly (bit for bit, see :func:`_undo_record`): the adapters merged after
        it come out first (last in, first out) and go back in afterwards, so the result does not depend on the order
        of unmerging."""
        if name not in self.merged:
            return
        order = list(self.merged)
        later = order[order.index(name) + 1:]
        for n in [*reversed(later), name]:
            self._take_out(n)
        del self.merged[name]
        for n in later:
            self._put_in(n, self.merged[n])
        self.refresh()

    def _put_in(self, name: str, weight: float) -> None:
        """Merge ``name`` into the weight and bias and record what its exact unmerge needs (:func:`_undo_record`)."""
        W, b = self.linear_weight(), self.base_bias()
        before = (W.detach().clone(), None if b is None else b.detach().clone())
        self.deltas[name].merge_into(W, b, weight)
        refuse_bad_merge(name, weight, (W, b), before)
        self._undo[name] = _undo_record(self.deltas[name], W, b, before, weight)

    def _take_out(self, name: str) -> None:
        """Apply the inverse update of the last merged adapter ``name``, then restore the entries its record says
        the inverse gets wrong: the weight and bias are bit for bit what they were before the merge."""
        W, b = self.linear_weight(), self.base_bias()
        fixes, invert = self._undo.pop(name, ((None, None), True))
        if invert:  # else every tensor the merge changed comes back from its copy
            self.deltas[name].merge_into(W, b, -self.merged[name])
        for target, fix in zip((W, b), fixes):
            _apply_fix(target, fix)

    def extra_repr(self) -> str:
        return f"active={list(self.active)}, merged={list(self.merged)}"


@torch.no_grad()
def refuse_bad_merge(name: str, scale: float, tensors: tuple, before: tuple) -> None:
    """After ``W, b <- merge`` (``tensors``; ``before``: their copies from before the merge): put the copies back
    and refuse when the merged weight or bias holds NaN/inf or ``max|W'| > max|W| / eps(dtype)``: past that,
    unmerging leaves rounding errors as large as the base weights themselves, so the base would be lost for good."""
    pairs = [(t, old) for t, old in zip(tensors, before) if t is not None]
    W, W0 = pairs[0]
    finite = all(bool(torch.isfinite(t).all()) for t, _ in pairs)
    prior = float(W0.abs().amax()) if W0.numel() else 0.0
    after = float(W.detach().abs().amax()) if finite and W.numel() else 0.0
    limit = prior / torch.finfo(W.dtype).eps if W.is_floating_point() else math.inf
    if finite and (prior == 0.0 or after <= limit):
        return
    for t, old in pairs:
        t.copy_(old)
    what = "NaN/inf weights" if not finite else f"weights {after / prior:.3g}x larger than the base"
    raise ValueError(f"merging adapter {name!r} with weight {scale} would give {what} in a {tuple(W.shape)} "
                     f"{W.dtype} layer, and unmerging could not restore the base; nothing was merged. Use a "
                     "smaller merge weight (or check the adapter's values)")


# -- exact unmerging ------------------------------------------------------------------------------------------------
def _undo_record(delta: Delta, W: torch.Tensor, b: torch.Tensor | None, before: tuple, weight: float) -> tuple:
    """What unmerging ``delta`` needs beyond its inverse update, for the weight and the bias just merged.

    Floating-point ``(W + u) - u`` is not always ``W`` (an entry smaller than ``u`` loses bits; half-precision
    weights round; a rotation's inverse is exact only up to rounding), and the error would add up over merge/unmerge
    round trips. So the inverse is tried once on a copy, and the record keeps the original values where it is off:
    nothing where it is exact, those entries (flat indices and values) where few are off, else a copy of the tensor.
    Generic: no structure has to declare whether its merge inverts exactly.

    Returns ``((weight fix, bias fix), invert)``; ``invert`` is False when every tensor the merge changed has a full
    copy, so unmerging only copies back. A multiplicative delta (a rotation: its inverse is never exact in floating
    point) keeps the copies without the trial."""
    changed = [orig is not None and not torch.equal(_bits(orig), _bits(now)) for orig, now in zip(before, (W, b))]
    if delta.multiplicative:
        return tuple(orig.cpu() if c else None for orig, c in zip(before, changed)), False
    trial = (W.clone(), None if b is None else b.clone())
    delta.merge_into(trial[0], trial[1], -weight)
    fixes = tuple(_fix(orig, got) for orig, got in zip(before, trial))
    invert = any(c and not isinstance(f, torch.Tensor) for c, f in zip(changed, fixes))
    return fixes, invert


def _fix(original: torch.Tensor | None, restored: torch.Tensor | None):
    """``None`` if ``restored`` equals ``original`` bit for bit, else ``(flat indices, values)`` of the entries that
    differ, or the whole ``original`` when that is smaller than the index list. Records are kept in host memory
    (int32 indices where they fit), so merging for inference does not take accelerator memory."""
    if original is None:
        return None
    wrong = _bits(restored) != _bits(original)  # bits, so -0.0 vs 0.0 and NaN payloads count too
    count = int(wrong.sum())
    if count == 0:
        return None
    size, small = original.element_size(), original.numel() < 2 ** 31
    if count * ((4 if small else 8) + size) >= original.numel() * size:
        return original.cpu()
    idx = wrong.reshape(-1).nonzero().squeeze(1)
    values = original.reshape(-1)[idx]
    return (idx.to(torch.int32) if small else idx).cpu(), values.cpu()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers of its element size."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(ints[t.element_size()]) if t.is_floating_point() else t


def _apply_fix(target: torch.Tensor | None, fix) -> None:
    """Write a :func:`_fix` record back into ``target`` (in place; ``target`` may be a transposed view)."""
    if fix is None or target is None:
        return
    with torch.no_grad():
        if isinstance(fix, torch.Tensor):
            target.copy_(fix)
        else:
            idx, values = (t.to(target.device) for t in fix)
            target.index_put_(torch.unravel_index(idx.long(), target.shape), values)


@dataclass
class AdapterInfo:
    method: Method
    modules: list[str]
    controller: Controller | None = None


@dataclass
class Registry:
    """Per-model state: adapters by name (in attach order), the active ones, which of those train (``None``: all
    active ones), the controller step counter."""

    adapters: dict[str, AdapterInfo] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    trainable: list[str] | None = None
    step: int = 0
    restored: bool = False  # ``step`` came from a checkpoint (dt.load) and no training step has run since
    merge_single: bool = False  # serving: run a batch whose rows all use one adapter with it merged
    serving_merged: str | None = None  # the adapter merged for that, if any
    hooks: list = field(default_factory=list)  # model(..., adapter_names=[...])
    resizable: bool = True  # what dt.begin decided: controllers may change parameter shapes
    total_steps: int | None = None  # what dt.begin was told
    optimizer: torch.optim.Optimizer | None = None  # the last one passed to dt.step / dt.after_backward

    def close(self, model: nn.Module) -> None:
        from .serving import close_hooks

        close_hooks(model, self.hooks)
        self.hooks = []
        if model.__dict__.get("save_pretrained") is not None:  # the adapter-saving method attach gave it
            del model.__dict__["save_pretrained"]

    def training(self) -> list[str]:
        """The active adapters whose parameters train."""
        return list(self.active) if self.trainable is None else [n for n in self.active if n in self.trainable]


# -- helpers ---------------------------------------------------------------------------------------------------
def registry(model: nn.Module, create: bool = False) -> Registry:
    model = unwrap(model)
    reg = model.__dict__.get(REGISTRY_ATTR)
    if reg is None:
        if not create:
            raise ValueError("this model has no deltatune adapters; attach one first with dt.attach(model, dt.LoRA())")
        from .serving import install_hooks, reopen_hooks

        reopen_hooks(model)
        reg = Registry()
        reg.hooks = install_hooks(model)
        model.__dict__[REGISTRY_ATTR] = reg
        if callable(getattr(type(model), "save_pretrained", None)):
            from .hf import save_pretrained

            # an instance method: model.save_pretrained (and the HF Trainer's checkpoints) write the adapters
            model.__dict__["save_pretrained"] = types.MethodType(save_pretrained, model)
    return reg


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    for name, module in unwrap(model).named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def _sync(model: nn.Module) -> None:
    """Push the registry's active list to every layer; ``requires_grad`` only on trainable adapters' parameters."""
    reg = registry(model)
    training = set(reg.training())
    for _, layer in adapted_layers(model):
        layer.active = tuple(reg.active)
        layer.refresh()
        for name, delta in layer.deltas.items():
            for p in delta.parameters():
                p.requires_grad_(name in training)


def check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name == "base":
        raise ValueError(f"adapter name {name!r} must be letters, digits, '_' or '-' (and not 'base')")
    reg = unwrap(model).__dict__.get(REGISTRY_ATTR)
    if reg is not None and name in reg.adapters:
        raise ValueError(f"an adapter named {name!r} is already attached; pick another name or dt.delete() it first")


def check_can_activate(model: nn.Module, name: str, activate: bool) -> None:
    """A new adapter may become the only active one only while no other adapter is merged into the weights (they
    would stay applied but inactive, and nothing could take them out consistently): refuse, saying what to do."""
    merged = sorted({n for _, layer in adapted_layers(model) for n in layer.merged})
    if activate and merged:
        raise ValueError(f"adapters {merged} are merged into the weights; making {name!r} the only active adapter "
                         f"would leave them applied but inactive. dt.unmerge(model) first, or pass activate=False")


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
    check_can_activate(model, name, activate)
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
    check_new_name(model, name)
    model = unwrap(model)
    check_can_activate(model, name, activate)
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
    reg.adapters[name].controller = method.controller(deltas(model, name), model)
    if activate or not reg.active:
        reg.active, reg.trainable = [name], None
    _sync(model)


def adapters(model: nn.Module) -> list[str]:
    """Names of the attached adapters, in attach order."""
    reg = unwrap(model).__dict__.get(REGISTRY_ATTR)
    return list(reg.adapters) if reg else []


def active_adapters(model: nn.Module) -> list[str]:
    return list(registry(model).active)


def _check_names(model: nn.Module, names: Iterable[str]) -> list[str]:
    reg = registry(model)
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in reg.adapters:
            raise ValueError(f"no adapter named {n!r}; attached adapters: {list(reg.adapters)}")
    return names


def set_active(model: nn.Module, names: str | Iterable[str],
               trainable: str | Iterable[str] | None = None) -> nn.Module:
    """Make ``names`` (one or several; their outputs add) the active adapters. Only they get gradients, or only
    ``trainable`` among them: ``dt.set_active(model, ["lang", "task"], trainable="task")`` trains a task adapter on
    top of a frozen language adapter (composable sparse fine-tuning); controllers run for trainable adapters."""
    names = _check_names(model, names)
    reg = registry(model)
    if trainable is not None:
        trainable = _check_names(model, trainable)
        extra = [n for n in trainable if n not in names]
        if extra:
            raise ValueError(f"trainable adapters {extra} are not among the active ones {names}")
    if reg.serving_merged is not None:  # merged for a single-adapter batch (dt.set_serving): take it out
        from .serving import _release_serving_merge

        _release_serving_merge(model)
    for _, layer in adapted_layers(model):
        stale = [n for n in layer.merged if n not in names]
        if stale:
            raise ValueError(f"adapters {stale} are merged into the weights; dt.unmerge(model) before switching")
    reg.active, reg.trainable = names, trainable
    _sync(model)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Run the plain base model inside the block (merged adapters are unmerged and re-merged after)."""
    layers = [layer for _, layer in adapted_layers(model)]
    merged = {id(layer): dict(layer.merged) for layer in layers}
    for layer in layers:
        for n in reversed(merged[id(layer)]):
            layer.unmerge(n)
        layer.enabled = False
        layer.refresh()
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True
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
        w = layer.base.weight
        if count.get(id(w), 0) > 1:
            warnings.warn(f"untying a shared weight of shape {tuple(w.shape)} before merging into it (tied "
                          "embeddings); the other module keeps the original values", stacklevel=3)
            layer.base.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)


def _merge_layers(model: nn.Module, names: list[str], weights: dict[str, float] | None = None) -> None:
    """Merge the not yet merged ``names`` on every layer; all or nothing (a refused layer takes the others out)."""
    todo = [layer for _, layer in adapted_layers(model) if any(n in layer.deltas and n not in layer.merged
                                                              for n in names)]
    _untie(model, todo)
    done: list[tuple[AdaptedLayer, str]] = []
    try:
        for layer in todo:
            # multiplicative deltas first: W R^T + dW is what the layer computes while both are live
            for n in sorted(names, key=lambda n: not (n in layer.deltas and layer.deltas[n].multiplicative)):
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
    names = _check_names(model, registry(model).active if names is None else names)
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
    _merge_layers(model, names, table)
    return model


def unmerge(model: nn.Module, names: str | Iterable[str] | None = None) -> nn.Module:
    """Subtract merged adapters from the base weights again (default: all merged adapters)."""
    for _, layer in adapted_layers(model):
        for n in list(reversed(layer.merged)) if names is None else _check_names(model, names):
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
    _merge_layers(model, keep)
    for name, layer in list(adapted_layers(model)):
        set_submodule(model, name, layer.base)
    model.__dict__.pop(REGISTRY_ATTR).close(model)
    return model


def delete(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` (unmerged first if needed); layers left without deltas are unwrapped."""
    _check_names(model, name)
    model = unwrap(model)
    reg = registry(model)
    for mod_name, layer in list(adapted_layers(model)):
        if name not in layer.deltas:
            continue
        layer.unmerge(name)
        del layer.deltas[name]
        layer.__dict__.pop("_plan_cache", None)
        if not len(layer.deltas):
            set_submodule(model, mod_name, layer.base)
    del reg.adapters[name]
    if reg.serving_merged == name:
        reg.serving_merged = None
    reg.active = [n for n in reg.active if n != name] or list(reg.adapters)[-1:]
    if reg.trainable is not None:
        reg.trainable = [n for n in reg.trainable if n != name] or None
    if not reg.adapters:
        model.__dict__.pop(REGISTRY_ATTR).close(model)
        return model
    _sync(model)
    return model


def deltas(model: nn.Module, name: str) -> dict[str, Delta]:
    """``{module name: delta}`` of adapter ``name``."""
    _check_names(model, name)
    return {mod: layer.deltas[name] for mod, layer in adapted_layers(model) if name in layer.deltas}


def method_of(model: nn.Module, name: str) -> Method:
    _check_names(model, name)
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


# -- controllers -----------------------------------------------------------------------------------------------
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
        c.begin(_step_info(reg))


def _step_info(reg: Registry, optimizer: torch.optim.Optimizer | None = None, last: bool = True) -> StepInfo:
    """What the controller hooks see. ``optimizer``: this call's, kept on the registry; ``last``: when it is
    ``None``, pass the last one given instead (``dt.step`` passes exactly its own: a step that resizes refuses to
    run without it)."""
    if optimizer is not None:
        reg.optimizer = optimizer
    return StepInfo(reg.step, reg.total_steps, reg.optimizer if last else optimizer, reg.resizable)


def after_backward(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """After ``loss.backward()`` (and gradient clipping) and before ``optimizer.step()``, for controllers that act on
    gradients before the update (SORSA's regularizer; the others need only :func:`step`). ``optimizer`` (or the last
    one passed) reaches them as ``StepInfo.optimizer``."""
    info = _step_info(registry(model), optimizer)
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
    info = _step_info(reg, optimizer, last=False)
    for c in _controllers(model):
        changed = bool(c.after_step(info)) or changed
    reg.step += 1
    reg.restored = False
    return changed


def controller(model: nn.Module, name: str = "default") -> Controller | None:
    """The controller of adapter ``name`` (``None`` for methods without one): ``controller(...).state_dict()`` is
    what ``dt.save`` stores with the adapter and ``dt.load`` restores."""
    _check_names(model, name)
    return registry(model).adapters[name].controller


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
