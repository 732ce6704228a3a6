"""Unstructured sparse delta (SpIEL, LT-SFT): ``dW.flatten()[idx] = values``.

- ``idx`` (k,) are unique flat indices into the (out x in) weight, ``values`` (k,) the trainable entries; the
  effective weight is ``W' = W + scatter(idx, values)``.
- Forward: ``y = x W'^T + b`` with ``W'`` formed on the fly (never stored; the base weight is untouched).
- Backward (``g = dL/dy``): the dense weight gradient ``G = g^T x`` is formed and gathered,
  ``dL/dvalues = G.flatten()[idx]``; ``dL/dx = g W'``. So ``.grad`` exists only at the active entries.

*Regrowth statistics.* A prune/regrow controller (SpIEL) asks for the dense gradient at positions that are not
active yet: while ``delta.observer`` is set, every backward hands ``G`` to it. The fused path gets ``G`` for free;
the generic path (several live deltas) forms ``dW`` and hooks its gradient, which is the same ``G``.

Sparse deltas on one weight compose by addition: ``W + dW_1 + dW_2`` (overlapping entries add).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..sharding import refuse_replacing
from .base import Delta, fused_inputs

Observer = Callable[[torch.Tensor], None]


# -- pure tensor math ---------------------------------------------------------------------------------------------
def scatter_dense(values: torch.Tensor, idx: torch.Tensor, shape: tuple[int, int],
                  base: torch.Tensor | None = None) -> torch.Tensor:
    """``base + scatter(idx, values)`` (``base`` defaults to zeros) as a new (out x in) tensor."""
    flat = values.new_zeros(shape[0] * shape[1]) if base is None else base.reshape(-1)
    return flat.index_add(0, idx, values.to(flat.dtype)).view(shape)


class _SparseLinear(torch.autograd.Function):
    """``x (W + scatter(idx, values))^T + b`` for a frozen ``W, b``."""

    @staticmethod
    def forward(ctx, x, W, b, values, idx, observer):
        W_eff = scatter_dense(values, idx, W.shape, base=W)
        out = torch.addmm(b, x, W_eff.t()) if b is not None else torch.mm(x, W_eff.t())
        ctx.save_for_backward(x, W, values, idx)
        ctx.observer = observer
        return out

    @staticmethod
    def backward(ctx, g):
        x, W, values, idx = ctx.saved_tensors
        need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        gv = gx = None
        if need_v:
            G = torch.mm(g.t(), x)
            if ctx.observer is not None:
                ctx.observer(G)
            gv = G.view(-1).index_select(0, idx)
        if need_x:
            gx = torch.mm(g, scatter_dense(values, idx, W.shape, base=W))
        return gx, None, None, gv, None, None


def sparse_linear(x, W, b, values, idx, observer: Observer | None = None) -> torch.Tensor:
    """The frozen linear layer with its sparse update as one autograd node; ``observer(G)`` sees the dense weight
    gradient on every backward when given."""
    return _SparseLinear.apply(x, W, b, values, idx, observer)


# -- the module --------------------------------------------------------------------------------------------------
class SparseDelta(Delta):
    """``dW.flatten()[idx] = values``; ``values`` start at zero."""

    structure = "sparse"
    #: entries can be removed while training (:func:`deltatune.budget.keep_components_` moves optimizer state)
    component_dims = {"values": 0}

    def __init__(self, out_features: int, in_features: int, idx: torch.Tensor,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__(out_features, in_features)
        idx = torch.as_tensor(idx, dtype=torch.long, device=device).reshape(-1)
        numel = out_features * in_features
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise ValueError(f"sparse-delta indices must be in [0, {numel}) for a ({out_features}, {in_features}) "
                             f"weight, got {int(idx.min())}..{int(idx.max())}")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError("sparse-delta indices must be unique")
        self.register_buffer("idx", idx)
        self.values = nn.Parameter(torch.zeros(idx.numel(), dtype=dtype, device=device))
        #: set by a controller to receive the dense weight gradient on each backward
        self.observer: Observer | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.dtype), self.dense())

    def fuse(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        cast = fused_inputs(x, weight, bias, self.values)
        if cast is None:
            return None
        return sparse_linear(*cast, self.idx, self.observer)

    def keep_(self, index: torch.Tensor) -> None:
        """Keep only entries ``index`` (positions in ``idx``); ``values`` becomes a new parameter."""
        refuse_replacing(self, "values", "drop entries of a sparse delta (LT-SFT's phase 2)",
                         "Train LT-SFT with DDP, or run its first phase unsharded")
        index = index.to(self.idx.device)
        self.idx = self.idx.index_select(0, index)
        self.values = nn.Parameter(self.values.detach().index_select(0, index).clone(),
                                   requires_grad=self.values.requires_grad)

    def dense(self) -> torch.Tensor:
        dW = scatter_dense(self.values, self.idx, self.shape)
        if self.observer is not None and dW.requires_grad:
            dW.register_hook(self.observer)
        return dW

    @classmethod
    def weighted_sum(cls, terms: list[tuple["SparseDelta", float]]) -> "SparseDelta":
        """``sum_i w_i dW_i`` on the union of the entries: ``idx = U_i idx_i``, ``values = sum_i w_i values_i``
        scattered onto it (entries active in several deltas add)."""
        first = terms[0][0]
        idx, inverse = torch.unique(torch.cat([d.idx for d, _ in terms]), return_inverse=True)
        values = torch.cat([d.values.detach().float() * w for d, w in terms])
        out = cls(first.out_features, first.in_features, idx, dtype=first.dtype, device=idx.device)
        with torch.no_grad():
            out.values.copy_(values.new_zeros(idx.numel()).index_add_(0, inverse, values))
        return out

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def spec(self) -> dict:
        return {**super().spec(), "k": int(self.idx.numel())}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Indices are stored as int32 when the weight has fewer than 2^31 entries (half the file size)."""
        small = self.out_features * self.in_features < 2**31
        return {"idx": self.idx.to(torch.int32) if small else self.idx, "values": self.values.detach()}

    @classmethod
    def from_spec(cls, spec: dict, tensors: dict[str, torch.Tensor]) -> "SparseDelta":
        idx, values = tensors["idx"].reshape(-1), tensors["values"].reshape(-1)
        if idx.numel() != values.numel():
            raise ValueError(f"sparse delta has {idx.numel()} indices but {values.numel()} values")
        d = cls(spec["out_features"], spec["in_features"], idx, dtype=values.dtype)
        with torch.no_grad():
            d.values.copy_(values)
        return d

    def extra_repr(self) -> str:
        density = self.idx.numel() / (self.out_features * self.in_features)
        return f"{super().extra_repr()}, k={self.idx.numel()} ({density:.2%})"
