"""The adapted-layer wrapper: a frozen layer plus named deltas, and exact merging into its weight.

A targeted layer ``m`` is replaced by ``AdaptedLayer(base=m)`` that holds one delta per adapter name::

    y = base(x) + sum over active, unmerged adapters a of  delta_a(x)

The layer's kind (:mod:`deltatune.layers`) says how its weight looks in linear layout and how a delta's contribution
is applied; deltas never know which kind they sit on. ``routing`` is the public slot a per-row router (mixed-adapter
batches, :mod:`deltatune.serving`) fills to take over the forward; ``generation`` counts changes of the set of
deltas, so caches built from them (stacked factors) can key on it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .checks import finite_number
from .deltas import Delta
from .layers import LayerWrapper, hooked, kind_of


class AdaptedLayer(LayerWrapper):
    """A frozen layer plus named deltas. ``y = base(x) + sum_a delta_a(x)`` over active, unmerged adapters."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.layer_kind = kind_of(base)
        self.kind = self.layer_kind.name
        self.deltas = nn.ModuleDict()
        self.active: tuple[str, ...] = ()  # the registry's active adapters (deltatune.registry.sync)
        #: the adapters applied instead of ``active`` while a ``deltatune.model.override_active`` block runs
        self.override: tuple[str, ...] | None = None
        self.merged: dict[str, float] = {}  # merged adapters in merge order, with the weight each was merged with
        self._undo: dict[str, tuple] = {}  # per merged adapter: what its inverse update would not restore exactly
        self._live: tuple[Delta, ...] = ()
        # the delta that computes the whole output, if any: a plain reference, never a registered submodule (it is
        # already registered under ``deltas``; a second registration puts its tensors twice into ``state_dict``)
        self.__dict__["_replacing"] = None
        #: a router with ``forward(layer, x, *args, **kwargs)`` (e.g. deltatune.serving.Rows while a mixed-adapter
        #: batch runs) that computes this layer's output instead of the plain sum; ``None`` otherwise
        self.routing = None
        self.generation = 0  # bumped whenever a delta is added or removed
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
        self.generation += 1
        self.refresh()

    def remove(self, name: str) -> None:
        """Take adapter ``name`` off this layer (unmerged first)."""
        self.unmerge(name)
        del self.deltas[name]
        self.generation += 1
        self.refresh()

    @property
    def applied(self) -> tuple[str, ...]:
        """The adapters this layer applies: ``override`` while one is set, else ``active``."""
        return self.active if self.override is None else self.override

    def refresh(self) -> None:
        """Recompute the tuple of deltas the forward applies (kept out of the hot path)."""
        live = [self.deltas[n] for n in self.applied if n in self.deltas and n not in self.merged]
        replacing = [d for d in live if d.replaces_output]
        # one replacing delta computes the whole output; several fall back to adding their dense updates
        self.__dict__["_replacing"] = replacing[0] if len(replacing) == 1 and not self.merged else None
        self._live = tuple(d for d in live if d is not self._replacing)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.routing is not None:
            return self.routing.forward(self, x, *args, **kwargs)
        hooks = hooked(self.base)
        if not self._plain or hooks:
            if not hooks and len(self._live) == 1 and self._replacing is None and not args and not kwargs:
                out = self.layer_kind.fuse(self.base, self._live[0], x)  # a kind's own fused kernel (convs)
                if out is not None:
                    return out
            # hooks and Linear subclasses see the layer as its callers do: original shapes, outputs left untouched
            out = self._base_output(x, *args, **kwargs)
            for d in self._live:
                out = self.layer_kind.add(self.base, d, out, x)
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
            return self.layer_kind.replace(self.base, self._replacing, x)
        return self.base(x, *args, **kwargs)

    def merge(self, name: str, weight: float = 1.0) -> None:
        """``W <- W + weight * dW_name`` (a delta that acts on the current weight: ``W <- W R(weight q)^T``), exactly."""
        weight = finite_number(weight, "merge weight")
        self.check_remerge(name, weight)
        if name in self.merged or name not in self.deltas:
            return
        delta = self.deltas[name]
        why = self.layer_kind.merge_refusal(self.base)
        if why is not None:
            raise ValueError(why)
        rotating = [n for n in self.applied if n in self.deltas and n not in self.merged and n != name
                    and self.deltas[n].acts_on_weight]
        if rotating and not delta.acts_on_weight:
            raise ValueError(f"cannot merge {name!r} while {rotating[0]!r} is live on the same layer: it multiplies "
                             "the layer's current weight, so it would then act on the merged update too and the "
                             f"output would change. Merge {rotating[0]!r} first (dt.merge merges in the order given) "
                             "or deactivate it")
        self._put_in(name, weight)
        self.merged[name] = weight
        self.refresh()

    def is_merged(self, delta: Delta) -> bool:
        """Whether ``delta`` (one of this layer's) is merged into the weight (asked by :meth:`Delta.is_merged`)."""
        return any(self.deltas[n] is delta for n in self.merged)

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
    copy, so unmerging only copies back. A delta that acts on the current weight (a rotation: its inverse is never exact in floating
    point) keeps the copies without the trial."""
    changed = [orig is not None and not torch.equal(_bits(orig), _bits(now)) for orig, now in zip(before, (W, b))]
    if delta.acts_on_weight:
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
