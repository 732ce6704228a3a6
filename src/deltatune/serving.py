"""Many adapters, one model: every row of a batch through its own adapter, in one forward pass.

For rows ``i = 1..n`` with adapter ``a(i)`` (``None`` or ``"base"``: the base model), every adapted layer computes

    y_i = W x_i + b + dW_{a(i)} x_i

once for the whole batch: the base product is shared and only the delta terms differ per row.

- **Low-rank deltas** (every structure whose :meth:`Delta.lowrank` is exact: LoRA and its SVD-initialized family,
  gated SVD triplets, frozen-basis adapters) run *gathered*: the layer's factors are stacked once per set of
  adapters, zero-padded to the largest rank ``r`` with the scale folded into ``B`` (slot 0 is all zeros, for rows
  without a low-rank delta here), and two batched matmuls over rows compute every row's update with its own
  factors, ``u_i = A_{a(i)} x_i``, ``y_i += B_{a(i)} u_i`` (``torch.bmm`` on gathered factors): the cost does not
  grow with the number of adapters, and there is no loop over rows or adapters.
- **Every other structure** (S2FT blocks, sparse entries, OFT rotations, dense and full deltas) runs *grouped*:
  per adapter present, its rows are gathered, its contribution ``dW_a x`` computed by the delta itself
  (:meth:`Delta.forward`; for a rotation ``W (R^T - I) x``) and added back to those rows (``index_add``).

Rows the model expands (``num_return_sequences``, beam search, or a layer that sees ``rows x tokens`` flattened)
follow their source row. The stacked factors are cached on the layer and rebuilt only when a parameter changes
(tracked by its in-place version counter), so repeated batches and every decoding step reuse them.

``merge_single=True`` takes the fastest path for a batch whose rows all use one adapter: that adapter is merged
into the weights (exactly, and kept merged while following batches use it; taken out again before a batch that
needs anything else), so the model runs at base-model speed. Merging costs one pass over the adapted weights:
it pays off when the same adapter serves several batches in a row (BENCHMARKS.md measures the break-even).
"""
from __future__ import annotations

import contextlib
import types
from collections.abc import Sequence

import torch
from torch import nn

from . import model as M

BASE = "base"


# -- pure tensor math -------------------------------------------------------------------------------------------------
def stack_factors(factors: list[tuple[torch.Tensor, torch.Tensor, float]], dtype: torch.dtype):
    """``(A, B)``: ``A`` (k+1, r, in) and ``B`` (k+1, out, r) with slot 0 zero and slot ``j`` holding factor ``j-1``
    (scale folded into ``B``), zero-padded to the largest rank ``r``."""
    r = max(A.shape[0] for _, A, _ in factors)
    out_f, in_f = factors[0][0].shape[0], factors[0][1].shape[1]
    A_all = torch.zeros(len(factors) + 1, r, in_f, dtype=dtype, device=factors[0][1].device)
    B_all = torch.zeros(len(factors) + 1, out_f, r, dtype=dtype, device=factors[0][0].device)
    for j, (B, A, s) in enumerate(factors, start=1):
        A_all[j, : A.shape[0]] = A.detach()
        B_all[j, :, : B.shape[1]] = B.detach() * s
    return A_all, B_all


def gathered_lowrank(x: torch.Tensor, A_all: torch.Tensor, B_all: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """``y_i = B_{slot(i)} A_{slot(i)} x_i`` for ``x`` (n, T, in): two batched matmuls on gathered factors."""
    u = torch.bmm(x, A_all.index_select(0, slot).transpose(1, 2))
    return torch.bmm(u, B_all.index_select(0, slot).transpose(1, 2))


def expand_rows(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Per-row values for a tensor of ``n`` rows whose rows expand the batch's ``len(ids)`` rows in order (``k``
    consecutive copies of each: generation with several sequences per prompt, or ``rows x tokens`` flattened)."""
    if n == ids.numel():
        return ids
    if n % ids.numel():
        raise ValueError(f"adapter_names has {ids.numel()} entries, but a layer got a batch of {n} rows; give one "
                         "adapter name per row of the batch")
    return ids.repeat_interleave(n // ids.numel())


# -- the routing ------------------------------------------------------------------------------------------------------
class Rows:
    """Which adapter each row uses: ``names`` (one per row), the distinct adapters, and per layer its plan."""

    def __init__(self, names: list[str | None]):
        self.names = names
        self.adapters = list(dict.fromkeys(n for n in names if n is not None))
        self.index = torch.tensor([0 if n is None else self.adapters.index(n) + 1 for n in names])
        self._expanded: dict[int, torch.Tensor] = {}

    def ids(self, n: int) -> torch.Tensor:
        """Adapter number per row (0: base, ``j``: ``adapters[j-1]``) for a tensor of ``n`` rows."""
        if n not in self._expanded:
            self._expanded[n] = expand_rows(self.index, n)
        return self._expanded[n]

    def forward(self, layer: "M.AdaptedLayer", x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The mixed-batch output of one adapted layer."""
        out = layer.base(x, *args, **kwargs)
        present = [n for n in self.adapters if n in layer.deltas]
        if not present:
            return out
        ids = self.ids(x.shape[0]).to(x.device)
        inplace = layer._plain and not M._hooked(layer.base)
        stack, grouped = layer_plan(layer, present) if layer.kind != "embedding" else (None, present)
        if stack is not None:
            A_all, B_all, slot_of = stack
            slot = torch.tensor([0] + [slot_of.get(n, 0) for n in self.adapters], device=x.device)[ids]
            upd = gathered_lowrank(x.reshape(x.shape[0], -1, x.shape[-1]).to(A_all.dtype), A_all, B_all, slot)
            upd = upd.reshape(out.shape).to(out.dtype)
            out = out.add_(upd) if inplace else out + upd
        for n in grouped:
            rows = (ids == self.adapters.index(n) + 1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            xs = x.index_select(0, rows)
            delta = layer.deltas[n]
            contrib = (delta.embed(xs) if layer.kind == "embedding" else delta(xs)).to(out.dtype)
            out = out.index_add_(0, rows, contrib) if inplace else out.index_add(0, rows, contrib)
        return out


def layer_plan(layer: "M.AdaptedLayer", names: list[str]):
    """``(stack, grouped)`` for the adapters ``names`` on ``layer``: ``stack = (A_all, B_all, {name: slot})`` for the
    low-rank ones (``None`` when there are none), cached on the layer until a parameter changes; ``grouped`` the
    names of the rest."""
    lowrank = [n for n in names if not layer.deltas[n].replaces_output and layer.deltas[n].lowrank() is not None]
    grouped = [n for n in names if n not in lowrank]
    if not lowrank:
        return None, grouped
    key = tuple((n, tuple(p._version for p in layer.deltas[n].parameters())) for n in lowrank)
    cache = layer.__dict__.get("_stack_cache")
    if cache is None or cache[0] != key:
        factors = [layer.deltas[n].lowrank() for n in lowrank]
        dtype = factors[0][1].dtype
        A_all, B_all = stack_factors(factors, dtype)
        cache = (key, (A_all, B_all, {n: j for j, n in enumerate(lowrank, start=1)}))
        layer.__dict__["_stack_cache"] = cache
    return cache[1], grouped


# -- entering and leaving a routing -------------------------------------------------------------------------------
def check_names(model: nn.Module, names) -> list[str | None]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"adapter_names must be a list with one adapter name (or None / 'base') per row, got {names!r}")
    known = M.adapters(model)
    rows = [None if n in (None, BASE) else n for n in names]
    unknown = sorted({n for n in rows if n is not None and n not in known})
    if unknown:
        raise ValueError(f"adapter_names has unknown adapters {unknown}; attached adapters: {known} (or None / "
                         f"'{BASE}' for the base model)")
    return rows


@contextlib.contextmanager
def adapter_rows(model: nn.Module, names, merge_single: bool | None = None):
    """Inside the block, row ``i`` of every batch runs through adapter ``names[i]`` (``None`` / ``"base"``: the base
    model). ``merge_single``: when every row uses one adapter, run it merged (default: the model's setting,
    :func:`set_serving`)."""
    model = M.unwrap(model)
    rows = check_names(model, names)
    if model.training:
        raise ValueError("mixed-adapter batches are for inference; call model.eval() first (train one adapter at a "
                         "time with dt.set_active)")
    reg = M.registry(model)
    merge_single = reg.merge_single if merge_single is None else merge_single
    layers = [layer for _, layer in M.adapted_layers(model)]
    single = len(set(rows)) == 1
    keep = rows[0] if single and merge_single and rows[0] is not None else None
    if reg.serving_merged not in (None, keep):
        _release_serving_merge(model)
    merged = sorted({n for layer in layers for n in layer.merged} - {keep})
    if merged:
        raise ValueError(f"adapters {merged} are merged into the weights, so no row could run without them; "
                         "dt.unmerge(model) before serving mixed batches")
    if single:
        with _only(model, layers, rows[0], merge_single):
            yield model
        return
    routing = Rows(rows)
    for layer in layers:
        layer._rows = routing
    try:
        yield model
    finally:
        for layer in layers:
            layer._rows = None


@contextlib.contextmanager
def _only(model: nn.Module, layers: list, name: str | None, merge: bool):
    """Every row uses ``name`` (``None``: the base): the layers run as if only it were active (the fused
    single-adapter path), or with it merged into the weights."""
    if name is not None and merge:
        M._merge_layers(model, [name])  # merges only the layers where it is not merged yet
        M.registry(model).serving_merged = name
    saved = [(layer, layer.active) for layer in layers]
    for layer in layers:  # merged, the adapter is not live on top of the weights either
        layer.active = () if name is None else (name,)
        layer.refresh()
    try:
        yield
    finally:
        for layer, active in saved:
            layer.active = active
            layer.refresh()


def _release_serving_merge(model: nn.Module) -> None:
    """Take the adapter merged by ``merge_single`` out of the weights again (exactly)."""
    reg = M.registry(model)
    if reg.serving_merged is not None:
        name, reg.serving_merged = reg.serving_merged, None
        if name in reg.adapters:
            M.unmerge(model, [name])


def set_serving(model: nn.Module, merge_single: bool = False) -> nn.Module:
    """Serving options: ``merge_single=True`` runs a batch whose rows all use one adapter with that adapter merged
    (kept merged across batches that use it). ``False`` takes such a merge out again."""
    reg = M.registry(model)
    reg.merge_single = bool(merge_single)
    if not merge_single:
        _release_serving_merge(model)
    return model


# -- ``model(..., adapter_names=[...])`` -----------------------------------------------------------------------------
def _enter(module: nn.Module, args, kwargs):
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return None
    ctx = adapter_rows(module, names)
    ctx.__enter__()
    module.__dict__.setdefault("_deltatune_rows", []).append(ctx)
    return args, kwargs


def _leave(module: nn.Module, args, kwargs, output=None):
    stack = module.__dict__.get("_deltatune_rows")
    if stack:
        stack.pop().__exit__(None, None, None)
    return None


def generate(self, *args, adapter_names=None, **kwargs):
    """``model.generate`` that accepts ``adapter_names`` (one per prompt): every decoding step routes the rows."""
    if adapter_names is None:
        return type(self).generate(self, *args, **kwargs)
    with adapter_rows(self, adapter_names):
        return type(self).generate(self, *args, **kwargs)


def install_hooks(model: nn.Module) -> list:
    """Let ``model(**batch, adapter_names=[...])`` route rows (a forward pre-hook takes the argument out), and
    ``model.generate(..., adapter_names=[...])`` when the model generates; returns the hook handles."""
    if callable(getattr(type(model), "generate", None)):
        model.__dict__["generate"] = types.MethodType(generate, model)
    return [model.register_forward_pre_hook(_enter, with_kwargs=True),
            model.register_forward_hook(_leave, with_kwargs=True, always_call=True)]


def remove_hooks(model: nn.Module, hooks: list) -> None:
    for h in hooks:
        h.remove()
    if getattr(model.__dict__.get("generate"), "__func__", None) is generate:
        del model.__dict__["generate"]
