"""Structured sparse delta (S2FT): a dense block on selected rows or columns of the original weight.

- Row type (axis 0, e.g. ``v``, ``up``): ``dW[idx, :] = D`` with ``D`` (k x in), so ``y[..., idx] += x D^T``.
- Column type (axis 1, e.g. ``o``, ``down``): ``dW[:, idx] = D`` with ``D`` (out x k), so ``y += x[..., idx] D^T``.

``idx`` are the *original* row or column indices: the delta applies to the unmodified base (the S2FT paper's code
permutes the model's weights in place to make the block contiguous; deltatune never does).

*Partial back-propagation.* When this is the only delta live on a frozen linear layer, the layer runs as one
autograd node (:func:`sliced_linear`) that keeps only what the block's gradient needs (``g = dL/dy``)::

    row type:     dL/dD = g[:, idx]^T x           (k x in: only the selected rows' gradient is computed)
    column type:  dL/dD = g^T x[:, idx]           (saves only the k selected input channels for backward)
    both:         dL/dx = g W + (the block's term), exact

``D`` is an ordinary parameter with an ordinary ``.grad``, so gradient accumulation, DDP and every optimizer work
unchanged. Merging writes ``D`` into ``k`` rows or columns of ``W``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Delta, fused_inputs

ROWS, COLUMNS = 0, 1


# -- pure tensor math ---------------------------------------------------------------------------------------------
def sliced_dense(D: torch.Tensor, idx: torch.Tensor, axis: int, shape: tuple[int, int]) -> torch.Tensor:
    """``dW`` (out x in): zeros except ``D`` on rows (axis 0) or columns (axis 1) ``idx``."""
    return D.new_zeros(shape).index_copy(axis, idx, D)


def sliced_apply(out: torch.Tensor, x: torch.Tensor, D: torch.Tensor, idx: torch.Tensor, axis: int) -> torch.Tensor:
    """``out + x dW^T`` for the block ``D`` (out-of-place; plain autograd)."""
    if axis == ROWS:
        return out.index_add(-1, idx, F.linear(x, D))
    return out + F.linear(x.index_select(-1, idx), D)


class _SlicedLinear(torch.autograd.Function):
    """``x W^T + b + x dW^T`` for a frozen ``W, b`` and a block ``D`` on rows / columns ``idx``."""

    @staticmethod
    def forward(ctx, x, W, b, D, idx, axis):
        out = torch.addmm(b, x, W.t()) if b is not None else torch.mm(x, W.t())
        if axis == ROWS:
            out.index_add_(1, idx, torch.mm(x, D.t()))
            ctx.save_for_backward(x, W, D, idx)
        else:
            x_sel = x.index_select(1, idx)
            out.addmm_(x_sel, D.t())
            ctx.save_for_backward(x_sel, W, D, idx)  # only the selected input channels
        ctx.axis = axis
        return out

    @staticmethod
    def backward(ctx, g):
        xs, W, D, idx = ctx.saved_tensors
        need_x, need_D = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        gx = gD = None
        if ctx.axis == ROWS:
            g_sel = g.index_select(1, idx)
            gD = torch.mm(g_sel.t(), xs) if need_D else None
            gx = torch.mm(g, W).addmm_(g_sel, D) if need_x else None
        else:
            gD = torch.mm(g.t(), xs) if need_D else None
            gx = torch.mm(g, W).index_add_(1, idx, torch.mm(g, D)) if need_x else None
        return gx, None, None, gD, None, None


def sliced_linear(x, W, b, D, idx, axis: int) -> torch.Tensor:
    """The frozen linear layer plus its block update as one autograd node (partial back-propagation).
    ``x``: (tokens x in); ``W``: (out x in) without gradient; ``idx``: int64 rows or columns of ``W``."""
    return _SlicedLinear.apply(x, W, b, D, idx, axis)


# -- the module --------------------------------------------------------------------------------------------------
class SlicedDelta(Delta):
    """``dW[idx, :] = D`` (``axis=0``) or ``dW[:, idx] = D`` (``axis=1``); ``D`` starts at zero."""

    structure = "sliced"

    def __init__(self, out_features: int, in_features: int, idx: torch.Tensor, axis: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__(out_features, in_features)
        if axis not in (ROWS, COLUMNS):
            raise ValueError(f"axis must be 0 (rows) or 1 (columns), got {axis}")
        idx = torch.as_tensor(idx, dtype=torch.long, device=device).reshape(-1)
        size = (out_features, in_features)[axis]
        if idx.numel() == 0:
            raise ValueError("a sliced delta needs at least one row or column")
        if int(idx.min()) < 0 or int(idx.max()) >= size:
            raise ValueError(f"{('row', 'column')[axis]} indices must be in [0, {size}), got {int(idx.min())}.."
                             f"{int(idx.max())}")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError("sliced-delta indices must be unique")
        self.axis = axis
        self.register_buffer("idx", idx)
        k = idx.numel()
        shape = (k, in_features) if axis == ROWS else (out_features, k)
        self.D = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))

    @property
    def dtype(self) -> torch.dtype:
        return self.D.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_to(x.new_zeros(*x.shape[:-1], self.out_features, dtype=self.dtype), x.to(self.dtype))

    def add_to(self, out: torch.Tensor, x: torch.Tensor, inplace: bool = True) -> torch.Tensor:
        if out.dtype != self.dtype:
            return out + self(x).to(out.dtype)
        return sliced_apply(out, x.to(self.dtype), self.D, self.idx, self.axis)

    def fuse(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        cast = fused_inputs(x, weight, bias, self.D)
        if cast is None:
            return None
        return sliced_linear(*cast, self.idx, self.axis)

    def dense(self) -> torch.Tensor:
        return sliced_dense(self.D, self.idx, self.axis, (self.out_features, self.in_features))

    @classmethod
    def weighted_sum(cls, terms: list[tuple["SlicedDelta", float]]) -> "SlicedDelta | None":
        """``sum_i w_i dW_i`` as one block on the union of the selected rows (or columns) when every delta selects
        along the same axis; ``None`` for a mix of row and column blocks (their sum is not one block)."""
        first = terms[0][0]
        if any(d.axis != first.axis for d, _ in terms):
            return None
        idx, inverse = torch.unique(torch.cat([d.idx for d, _ in terms]), return_inverse=True)
        blocks = torch.cat([d.D.detach().float() * w for d, w in terms], dim=first.axis)
        out = cls(first.out_features, first.in_features, idx, first.axis, dtype=first.dtype, device=idx.device)
        with torch.no_grad():
            out.D.copy_(torch.zeros_like(out.D, dtype=blocks.dtype).index_add_(first.axis, inverse, blocks))
        return out

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def spec(self) -> dict:
        return {**super().spec(), "axis": self.axis, "k": int(self.idx.numel())}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"idx": self.idx, "D": self.D.detach()}

    @classmethod
    def from_spec(cls, spec: dict, tensors: dict[str, torch.Tensor]) -> "SlicedDelta":
        idx, D = tensors["idx"], tensors["D"]
        axis, out_f, in_f = int(spec["axis"]), spec["out_features"], spec["in_features"]
        want = (idx.numel(), in_f) if axis == ROWS else (out_f, idx.numel())
        if tuple(D.shape) != want:
            raise ValueError(f"sliced delta block has shape {tuple(D.shape)}, expected {want} for {idx.numel()} "
                             f"{('rows', 'columns')[axis]} of a ({out_f}, {in_f}) weight")
        d = cls(out_f, in_f, idx, axis, dtype=D.dtype)
        with torch.no_grad():
            d.D.copy_(D)
        return d

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {('rows', 'columns')[self.axis]}={self.idx.numel()}"
