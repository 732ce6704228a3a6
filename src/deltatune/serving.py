"""Many adapters, one model: every row of a batch through its own adapter, in one forward pass (and one backward).

For rows ``i = 1..n`` with adapter ``a(i)`` (``None`` or ``"base"``: the base model), every adapted layer computes

    y_i = W x_i + b + dW_{a(i)} x_i

once for the whole batch: the base product is shared and only the delta terms differ per row.

- **Stacked** (every structure whose :meth:`Delta.lowrank` is exact: LoRA and its SVD-initialized family, gated SVD
  triplets (AdaLoRA, SoRA, ...), frozen-basis adapters (VeRA, NOLA, Orthogonal Adaptation), on layers whose inputs
  are features on the last dimension: ``Linear``, GPT-2 ``Conv1D``): the layer's factors are stacked, zero-padded
  to the largest rank ``r`` with the scale folded into ``B`` (slot 0 is all zeros, for rows without a low-rank delta
  here), and two batched matmuls over rows compute every row's update with its own factors,
  ``u_i = A_{a(i)} x_i``, ``y_i += B_{a(i)} u_i`` (``torch.bmm`` on gathered factors, or, when rows have a token or
  two, plain matmuls over all slots with a per-row mask): the cost does not grow with the number of adapters, and
  there is no loop over rows or adapters. For inference the second product accumulates into the layer's output in
  place (``baddbmm_``): no temporary of the output's size.
- **Grouped** (every other structure: S2FT blocks, sparse entries (SpIEL, LT-SFT), OFT rotations, dense and full
  deltas; and every delta on embeddings and ``nn.Conv1d/2d/3d``, LoCon included): per adapter present, its rows are
  gathered, its contribution ``dW_a x`` computed by the delta itself (:meth:`Delta.forward`; for a rotation
  ``W (R^T - I) x``) and added back to those rows (``index_add``). A delta gated per row by the batch's condition
  (:attr:`Delta.routed`: KIND's class gate) computes its contribution on the whole batch (its gate follows every
  row of the batch) and only its own rows are added.

Rows the model expands (``num_return_sequences``, beam search, or a layer that sees ``rows x tokens`` flattened)
follow their source row.

**Inference** (gradients off, or no parameter of the layer's deltas requires one): the stacked factors are cached
on the layer (detached) and rebuilt only when a parameter changes (tracked by its in-place version counter), so
repeated batches and every decoding step reuse them.

**Training** (``model.train()``, gradients on): the same math builds its graph. The stacks are rebuilt every call
from :meth:`Delta.live_factors` without detaching (``torch.stack`` of zero-padded factors, scale folded into ``B``),
and the products and ``index_add`` run out of place, so the backward gives each adapter exactly the gradient of its
own rows: for a loss summed over rows, the gradients of a mixed batch are the sum of each adapter's gradients run
alone on its rows. Rows of the base model give no adapter a gradient. Each adapter's input transform
(:meth:`Delta.drop`: input dropout) acts on its own rows (under ``torch.no_grad`` the stacked adapters run the
inference path, without it). *Which adapters train*: those whose parameters require
grad, i.e. the registry's trainable adapters: ``dt.set_active(model, ["a", "b", "c"])`` makes all three trainable
(``trainable=`` picks some of them); the routing, not the active set, decides which rows each one sees, and
adapters named in the batch but not trainable act on their rows frozen. A trainable adapter with no row in the
batch takes part on zero rows (an unused stack slot, or a grouped call on no rows), so its gradient is zeros rather
than ``None``: under ``DistributedDataParallel`` every rank builds the same graph, whichever adapters its rows use,
and no ``find_unused_parameters`` is needed (with Adam-like optimizers such an adapter still moves by its momentum,
as it would under DDP anyway; make it non-trainable to leave it out). In training mode nothing is merged and a batch
whose rows all use one adapter is routed too. Gradient checkpointing recomputes layers during the backward, after
``model(..., adapter_names=...)`` has returned: that call is refused with it; run forward and backward inside
``with dt.adapter_rows(model, names):`` instead.

``merge_single=True`` takes the fastest path for an inference batch whose rows all use one adapter: that adapter is
merged into the weights (exactly, and kept merged while following batches use it; taken out again before a batch
that needs anything else), so the model runs at base-model speed. Merging costs one pass over the adapted weights:
it pays off when the same adapter serves several batches in a row (BENCHMARKS.md measures the break-even).
"""
from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import model as M
from .adapted import AdaptedLayer
from .layers import hooked, unwrap
from .registry import BEFORE_SWITCH, ON_CLOSE, ON_CREATE, ON_DELETE, adapted_layers, adapter_names, registry

BASE = "base"


class ServingState:
    """Per-model serving state, kept in the registry's ``extras``: whether single-adapter batches run merged, the
    adapter merged for that (if any), and the hook handles of ``model(..., adapter_names=[...])``."""

    def __init__(self):
        self.merge_single = False
        self.merged: str | None = None
        self.hooks: list = []


def state(model: nn.Module) -> ServingState:
    return registry(model).extras.setdefault("serving", ServingState())


# -- pure tensor math -------------------------------------------------------------------------------------------------
def stack_factors(factors: list[tuple[torch.Tensor, torch.Tensor, float]], dtype: torch.dtype, detach: bool = True):
    """``(A^T, B^T)`` stacks: ``A^T`` (k+1, in, r) and ``B^T`` (k+1, r, out), slot 0 zero and slot ``j`` holding factor
    ``j-1`` (scale folded into ``B``), zero-padded to the largest rank ``r`` (laid out for ``x A^T`` and ``u B^T``).
    ``detach=False`` keeps the graph (``torch.stack`` of padded factors): gradients of the stacks flow back to every
    factor, and slots no row uses get zero gradients."""
    r = max(A.shape[0] for _, A, _ in factors)
    out_f, in_f = factors[0][0].shape[0], factors[0][1].shape[1]
    At = [torch.zeros(in_f, r, dtype=dtype, device=factors[0][1].device)]
    Bt = [torch.zeros(r, out_f, dtype=dtype, device=factors[0][0].device)]
    for B, A, s in factors:
        A, B = (A.detach(), B.detach()) if detach else (A, B)
        At.append(F.pad(A.t().to(dtype), (0, r - A.shape[0])))
        Bt.append(F.pad((B.t() * s).to(dtype), (0, 0, 0, r - B.shape[1])))
    return torch.stack(At), torch.stack(Bt)


def drop_rows(x: torch.Tensor, parts: list[tuple[torch.Tensor, Callable]]) -> torch.Tensor:
    """``x`` (n, ...) with rows ``rows`` replaced by ``drop(x[rows])`` for every ``(rows, drop)`` in ``parts`` (each
    adapter's input transform, e.g. its input dropout, on its own rows; out of place). Unchanged when every
    ``drop`` is the identity."""
    for rows, drop in parts:
        xs = x.index_select(0, rows)
        xd = drop(xs)
        if xd is not xs:
            x = x.index_copy(0, rows, xd.to(x.dtype))
    return x


def flat_A(At: torch.Tensor) -> torch.Tensor:
    """``[A_0^T | A_1^T | ...]`` (in, (k+1) r) from the (k+1, in, r) stack."""
    return At.permute(1, 0, 2).reshape(At.shape[1], -1).contiguous()


def add_masked_lowrank(out: torch.Tensor, x: torch.Tensor, A_flat: torch.Tensor, Bt: torch.Tensor,
                       onehot: torch.Tensor, inplace: bool = True) -> torch.Tensor:
    """The same sum computed over all slots at once: ``u = x [A_0^T | A_1^T | ...]``, each row's ``u`` masked to its
    own slot (``onehot`` (n, k+1)), ``out += u [B_0^T; B_1^T; ...]``: two plain matmuls reading every factor once,
    with no per-row copies; cheaper than gathering when rows have few tokens (decoding)."""
    n, T, _ = x.shape
    slots, r = Bt.shape[0], Bt.shape[1]
    u = torch.mm(x.reshape(n * T, -1), A_flat).view(n, T, slots, r).mul_(onehot.view(n, 1, slots, 1))
    out2 = out.reshape(n * T, -1)
    flat_B = Bt.view(slots * r, -1)
    return (out2.addmm_(u.view(n * T, -1), flat_B) if inplace else torch.addmm(out2, u.view(n * T, -1), flat_B)) \
        .reshape(out.shape)


#: when to use :func:`add_masked_lowrank` instead of :func:`add_gathered_lowrank` for ``n`` rows of ``T`` tokens and
#: ``k + 1`` slots: the masked form does ``k + 1`` times the multiply-adds but reads each factor once instead of
#: copying it for every row; a float moved costs about ``COPY_COST`` multiply-adds on a CPU
COPY_COST = 16


def masked_is_cheaper(n: int, T: int, slots: int) -> bool:
    return slots * (COPY_COST + n * T) < n * (2 * COPY_COST + T)


def add_gathered_lowrank(out: torch.Tensor, x: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor, slot: torch.Tensor,
                         inplace: bool = True) -> torch.Tensor:
    """``out_i + B_{slot(i)} A_{slot(i)} x_i`` for ``x`` (n, T, in) and ``out`` (n, T, out): one batched matmul on
    gathered ``A`` factors and one batched multiply-add on gathered ``B`` factors, into ``out`` when ``inplace``
    (no temporary of the output's size)."""
    u = torch.bmm(x, At.index_select(0, slot))
    Bs = Bt.index_select(0, slot)
    return out.baddbmm_(u, Bs) if inplace else torch.baddbmm(out, u, Bs)


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
        self._plans: dict[int, tuple] = {}
        self._rows: dict[tuple, torch.Tensor] = {}

    def ids(self, n: int) -> torch.Tensor:
        """Adapter number per row (0: base, ``j``: ``adapters[j-1]``) for a tensor of ``n`` rows."""
        if n not in self._expanded:
            self._expanded[n] = expand_rows(self.index, n)
        return self._expanded[n]

    def forward(self, layer: AdaptedLayer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The mixed-batch output of one adapted layer: the training path (:meth:`train_forward`) when gradients are
        on and a delta of this layer has a parameter that requires them, else the cached inference path."""
        out = layer.base(x, *args, **kwargs)
        if torch.is_grad_enabled():
            trained = [n for n, d in layer.deltas.items() if any(p.requires_grad for p in d.parameters())]
            if trained:
                present = [n for n in self.adapters if n in layer.deltas]
                return self.train_forward(layer, x, out, present, trained)
        plan = self._plans.get(id(layer))
        if plan is None:  # once per routing and layer: parameters do not change during inference
            present = [n for n in self.adapters if n in layer.deltas]
            stack, grouped = (layer_plan(layer, present) if layer.layer_kind.stacked else (None, present)) \
                if present else (None, [])
            plan = self._plans[id(layer)] = (stack, grouped, layer._plain and not hooked(layer.base), {})
        stack, grouped, inplace, slots = plan
        n_rows = x.shape[0]
        if stack is not None:
            At, Bt, A_flat, slot_of = stack
            if n_rows not in slots:  # the stack slot of every row
                slot = self.slots(slot_of, n_rows, x.device)
                slots[n_rows] = (slot, torch.nn.functional.one_hot(slot, At.shape[0]).to(At.dtype))
            slot, onehot = slots[n_rows]
            x3 = x.reshape(n_rows, -1, x.shape[-1]).to(At.dtype)
            out3 = out.reshape(n_rows, -1, out.shape[-1])
            same = out3.dtype == At.dtype
            target = out3 if same else torch.zeros_like(out3, dtype=At.dtype)
            if masked_is_cheaper(n_rows, x3.shape[1], At.shape[0]):
                upd = add_masked_lowrank(target, x3, A_flat, Bt, onehot, inplace or not same)
            else:
                upd = add_gathered_lowrank(target, x3, At, Bt, slot, inplace or not same)
            out = upd.reshape(out.shape) if same else out + upd.reshape(out.shape).to(out.dtype)
        for n in grouped:
            rows = self.rows_of(n, n_rows, x.device)
            if rows.numel() == 0:
                continue
            contrib = grouped_output(layer, layer.deltas[n], x, rows).to(out.dtype)
            out = out.index_add_(0, rows, contrib) if inplace else out.index_add(0, rows, contrib)
        return out

    def train_forward(self, layer: AdaptedLayer, x: torch.Tensor, out: torch.Tensor, present: list[str],
                      trained: list[str]) -> torch.Tensor:
        """The same sum with gradients, ``out`` the base output: the factors (:meth:`Delta.live_factors`) are stacked
        every call without detaching (:func:`stack_factors`), each adapter's rows get its input transform
        (:meth:`Delta.drop`, input dropout: :func:`drop_rows`), and every product and addition runs out of place.
        The deltas of ``trained`` (this layer's deltas with a parameter that requires grad) that no row uses take
        part on zero rows (an unused stack slot, or a grouped call on no rows), so their gradients are zeros, not
        ``None``: every rank of a data-parallel run builds the same graph whichever adapters its rows use."""
        names = present + [n for n in trained if n not in present]
        factors = {}
        if layer.layer_kind.stacked:
            factors = {n: f for n in names if not layer.deltas[n].replaces_output and not layer.deltas[n].routed
                       and (f := layer.deltas[n].live_factors()) is not None}
        n_rows = x.shape[0]
        if factors:
            lowrank = list(factors)
            At, Bt = stack_factors([factors[n] for n in lowrank], factors[lowrank[0]][1].dtype, detach=False)
            slot = self.slots({n: j for j, n in enumerate(lowrank, start=1)}, n_rows, x.device)
            x3 = x.reshape(n_rows, -1, x.shape[-1]).to(At.dtype)
            x3 = drop_rows(x3, [(self.rows_of(n, n_rows, x.device), layer.deltas[n].drop) for n in lowrank
                                if n in present])
            out3 = out.reshape(n_rows, -1, out.shape[-1])
            target = out3 if out3.dtype == At.dtype else torch.zeros_like(out3, dtype=At.dtype)
            if masked_is_cheaper(n_rows, x3.shape[1], At.shape[0]):
                onehot = torch.nn.functional.one_hot(slot, At.shape[0]).to(At.dtype)
                upd = add_masked_lowrank(target, x3, flat_A(At), Bt, onehot, inplace=False)
            else:
                upd = add_gathered_lowrank(target, x3, At, Bt, slot, inplace=False)
            out = upd.reshape(out.shape) if target is out3 else out + upd.reshape(out.shape).to(out.dtype)
        for n in names:
            if n in factors:
                continue
            rows = self.rows_of(n, n_rows, x.device) if n in present else torch.zeros(0, dtype=torch.long,
                                                                                      device=x.device)
            contrib = grouped_output(layer, layer.deltas[n], x, rows)
            out = out.index_add(0, rows, contrib.to(out.dtype))
        return out

    def slots(self, slot_of: dict[str, int], n_rows: int, device) -> torch.Tensor:
        """The stack slot of every row of a tensor of ``n_rows`` rows (0 for rows whose adapter is not stacked)."""
        table = torch.tensor([0] + [slot_of.get(n, 0) for n in self.adapters])
        return table[self.ids(n_rows)].to(device)

    def rows_of(self, name: str, n_rows: int, device) -> torch.Tensor:
        """The rows (of a tensor of ``n_rows`` rows) that use adapter ``name``."""
        key = (name, n_rows)
        if key not in self._rows:
            self._rows[key] = (self.ids(n_rows) == self.adapters.index(name) + 1).nonzero().squeeze(1).to(device)
        return self._rows[key]


def grouped_output(layer: AdaptedLayer, delta, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """One grouped delta's contribution to ``rows`` of ``x``: computed on those rows alone, or, for a delta gated per
    row (:attr:`Delta.routed`, e.g. KIND's class gate: its gate follows the whole batch's condition), on the whole
    batch and then cut to ``rows``."""
    if delta.routed:
        return layer.layer_kind.output(layer.base, delta, x).index_select(0, rows)
    return layer.layer_kind.output(layer.base, delta, x.index_select(0, rows))


def layer_plan(layer: AdaptedLayer, names: list[str]):
    """``(stack, grouped)`` for the adapters ``names`` on ``layer``: ``stack = (A^T, B^T, [A^T | ...], {name: slot})``
    (:func:`stack_factors`, :func:`flat_A`) for the
    low-rank ones (``None`` when there are none) and ``grouped`` the names of the rest; cached on the layer until
    one of these adapters' parameters changes (their in-place version counters)."""
    key = (layer.generation,) + tuple((n, id(d), getattr(d, "scale", None), tuple((id(t), t._version, t.dtype, t.device)
                                                             for t in (*d.parameters(), *d.buffers())))
                for n, d in ((n, layer.deltas[n]) for n in names))
    cache = layer.__dict__.get("_plan_cache")
    if cache is None or cache[0] != key:
        factors = {n: layer.deltas[n].lowrank() for n in names
                   if not layer.deltas[n].replaces_output and not layer.deltas[n].routed}
        lowrank = [n for n, f in factors.items() if f is not None]
        stack = None
        if lowrank:
            At, Bt = stack_factors([factors[n] for n in lowrank], factors[lowrank[0]][1].dtype)
            stack = (At, Bt, flat_A(At), {n: j for j, n in enumerate(lowrank, start=1)})
        cache = (key, (stack, [n for n in names if n not in lowrank]))
        layer.__dict__["_plan_cache"] = cache
    return cache[1]


# -- entering and leaving a routing -------------------------------------------------------------------------------
def check_names(model: nn.Module, names) -> list[str | None]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"adapter_names must be a list with one adapter name (or None / 'base') per row, got {names!r}")
    if not names:
        raise ValueError("adapter_names is empty; give one adapter name (or None / 'base') per row")
    known = adapter_names(model)
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
    :func:`set_serving`). In training mode (``model.train()``) nothing is merged and every batch runs the routed
    path, also one whose rows all use one adapter (so that every rank of a data-parallel run builds the same
    graph); a backward inside the block is routed too (gradient checkpointing recomputes there)."""
    model = unwrap(model)
    rows = check_names(model, names)
    serving = state(model)
    merge_single = (serving.merge_single if merge_single is None else merge_single) and not model.training
    layers = [layer for _, layer in adapted_layers(model)]
    single = len(set(rows)) == 1 and not model.training
    keep = rows[0] if single and merge_single and rows[0] is not None else None
    if serving.merged not in (None, keep):
        _release_serving_merge(model)
    merged = sorted({n for layer in layers for n in layer.merged} - ({keep} if serving.merged == keep else set()))
    if merged:
        raise ValueError(f"adapters {merged} are merged into the weights, so no row could run without them; "
                         "dt.unmerge(model) before serving mixed batches")
    if single:
        with _only(model, rows[0], merge_single):
            yield model
        return
    routing = Rows(rows)
    previous = [(layer, layer.routing) for layer in layers]
    for layer in layers:
        layer.routing = routing
    try:
        yield model
    finally:
        for layer, before in previous:
            layer.routing = before


@contextlib.contextmanager
def _only(model: nn.Module, name: str | None, merge: bool):
    """Every row uses ``name`` (``None``: the base): the layers run as if only it were active (the fused
    single-adapter path); or, with ``merge``, it is merged into the weights and becomes the active adapter (so that
    calls without ``adapter_names`` see the same model), until a batch needs something else or
    :func:`set_serving` / ``dt.set_active`` takes it out."""
    if name is not None and merge:
        serving = state(model)
        if serving.merged != name:
            reg = registry(model)
            before = list(reg.active), reg.trainable
            M.set_active(model, [name])  # only this adapter is live while it goes in (a live rotation would refuse it)
            try:
                M.merge_layers(model, [name])
            except Exception:
                M.unmerge(model, [name])
                M.set_active(model, before[0], trainable=before[1])
                raise
            serving.merged = name
        yield
        return
    with M.override_active(model, () if name is None else (name,)):
        yield


def _release_serving_merge(model: nn.Module) -> None:
    """Take the adapter merged by ``merge_single`` out of the weights again (exactly)."""
    serving = state(model)
    if serving.merged is not None:
        name, serving.merged = serving.merged, None
        if name in adapter_names(model):
            M.unmerge(model, [name])


def set_serving(model: nn.Module, merge_single: bool = False) -> nn.Module:
    """Serving options: ``merge_single=True`` runs a batch whose rows all use one adapter with that adapter merged
    (kept merged across batches that use it). ``False`` takes such a merge out again."""
    state(model).merge_single = bool(merge_single)
    if not merge_single:
        _release_serving_merge(model)
    return model


# -- ``model(..., adapter_names=[...])`` -----------------------------------------------------------------------------
def _batch_size(args, kwargs) -> int | None:
    for key in ("input_ids", "inputs_embeds", "pixel_values"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key].shape[0]
    first = args[0] if args else None
    return first.shape[0] if isinstance(first, torch.Tensor) else None


def _enter(module: nn.Module, args, kwargs):
    """Forward pre-hook: with ``adapter_names=`` the call runs inside :func:`adapter_rows` (a one-shot forward hook
    leaves it, also when the forward raises); without it the hook returns at once."""
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return None
    n = _batch_size(args, kwargs)
    if n is not None and not isinstance(names, str) and len(names) != n:
        raise ValueError(f"adapter_names has {len(names)} entries for a batch of {n} rows; give one per row")
    if module.training and torch.is_grad_enabled() and _checkpointing(module):
        raise ValueError("model(..., adapter_names=[...]) with gradient checkpointing: the backward recomputes the "
                         "layers after the call has ended, without the routing, so the gradients would be wrong. "
                         "Run the forward and the backward inside `with dt.adapter_rows(model, names):` instead")
    ctx = adapter_rows(module, names)
    ctx.__enter__()
    handle = module.register_forward_hook(_leave, with_kwargs=True, always_call=True)
    module.__dict__.setdefault("_deltatune_rows", []).append((ctx, handle))
    return args, kwargs


def _checkpointing(model: nn.Module) -> bool:
    """Whether some submodule recomputes its forward in the backward (the ``gradient_checkpointing`` flag that
    ``transformers`` and ``diffusers`` models set)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _leave(module: nn.Module, args, kwargs, output=None):
    stack = module.__dict__.get("_deltatune_rows")
    if stack:
        ctx, handle = stack.pop()
        handle.remove()
        ctx.__exit__(None, None, None)
    return None


def generate(self, *args, adapter_names=None, **kwargs):
    """``model.generate`` that accepts ``adapter_names`` (one per prompt): every decoding step routes the rows."""
    if adapter_names is None:
        return type(self).generate(self, *args, **kwargs)
    with adapter_rows(self, adapter_names):
        return type(self).generate(self, *args, **kwargs)


CLOSED_ATTR = "_deltatune_closed"  # the hook that refuses adapter_names once the last adapter is gone


def _refuse_names(module: nn.Module, args, kwargs):
    if kwargs.get("adapter_names") is not None:
        raise ValueError("adapter_names given, but this model has no deltatune adapters any more (dt.unload or "
                         "dt.delete removed them), so it would be ignored; attach or dt.load adapters first, or "
                         "drop adapter_names")


# -- registered with the registry ---------------------------------------------------------------------------------
def open_hooks(model: nn.Module, reg) -> None:
    """A model gets its first adapter: ``model(**batch, adapter_names=[...])`` routes rows (one forward pre-hook
    that takes the argument out; the hook that leaves the routing exists only while a routed call runs), and
    ``model.generate(..., adapter_names=[...])`` when the model generates."""
    handle = model.__dict__.pop(CLOSED_ATTR, None)
    if handle is not None:
        handle.remove()
    if callable(getattr(type(model), "generate", None)):
        model.__dict__["generate"] = types.MethodType(generate, model)
    reg.extras.setdefault("serving", ServingState()).hooks = [
        model.register_forward_pre_hook(_enter, with_kwargs=True)]


def close_hooks(model: nn.Module, reg) -> None:
    """The last adapter is gone: remove the routing hooks; from then on ``adapter_names=`` is refused instead of
    silently ignored (the model's own forward may swallow unknown keyword arguments), until adapters are attached
    again."""
    serving = reg.extras.get("serving")
    for h in serving.hooks if serving is not None else []:
        h.remove()
    if getattr(model.__dict__.get("generate"), "__func__", None) is generate:
        del model.__dict__["generate"]
    if CLOSED_ATTR not in model.__dict__:
        model.__dict__[CLOSED_ATTR] = model.register_forward_pre_hook(_refuse_names, with_kwargs=True)


def _forget_deleted(model: nn.Module, name: str) -> None:
    serving = registry(model).extras.get("serving")
    if serving is not None and serving.merged == name:
        serving.merged = None


ON_CREATE.append(open_hooks)
ON_CLOSE.append(close_hooks)
BEFORE_SWITCH.append(_release_serving_merge)
ON_DELETE.append(_forget_deleted)
