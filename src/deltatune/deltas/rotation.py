"""Multiplicative orthogonal delta (OFT, Qiu et al., NeurIPS 2023): ``W' = W R^T`` with ``R`` block-diagonal.

``R = diag(R_1, ..., R_n)`` has ``n = in / b`` blocks of size ``b``; each block is the Cayley transform of a
skew-symmetric ``Q_k = S_k - S_k^T`` whose strict upper triangle ``S_k`` holds the trainable vector ``q_k``
(``b (b - 1) / 2`` numbers, zero at init so ``R = I``)::

    exact:    R_k = (I + Q_k)(I - Q_k)^{-1}                            (orthogonal for any Q_k)
    neumann:  R_k = I + 2 Q_k + 2 Q_k^2 + ... + 2 Q_k^{m-2} + Q_k^{m-1}    (its series, m terms; no solve)

The rotation acts on the *input*: with row vectors the layer computes ``y = (x R) W^T + b`` block by block
(``x_k R_k``), so the weight is never copied in the forward and ``W' = W R^T``. When this delta is the only one
live on a frozen linear layer, the layer is one autograd node that saves only ``x`` and ``R``::

    x_r = x R                  (forward: n small products of size b)
    g_r = g W                  (the frozen layer's own input gradient)
    dL/dx   = g_r R^T
    dL/dR_k = x_k^T g_{r,k}    (b x b per block)

Autograd carries ``dL/dR`` back to ``q`` through the Cayley transform. Merging is multiplicative and exact:
``W <- W R^T``, and unmerging ``W <- W (R^T)^{-1}`` (``R`` itself, up to rounding, when ``R`` is exactly
orthogonal; the inverse also undoes a Neumann ``R`` exactly). As an additive update of the weight it sits on,
``dW = W (R^T - I)``: that is what :meth:`dense` returns (for exports and analysis), so a rotation composes with
additive deltas live on the same layer.

Convention check against PEFT's ``OFTConfig`` (which also right-multiplies rows, ``x R``): its Neumann ``R`` is the
one above, so identical parameters give identical outputs; its exact variant is ``(I - Q)(I + Q)^{-1}``, i.e. ours
with ``q -> -q``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Delta, fused_inputs

CAYLEY = ("exact", "neumann")


# -- pure tensor math ------------------------------------------------------------------------------------------
def skew(q: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, b: int) -> torch.Tensor:
    """``Q = S - S^T`` (n x b x b) with ``S``'s strict upper triangle ``(rows, cols)`` set to ``q`` (n x b(b-1)/2)."""
    S = q.new_zeros(q.shape[0], b, b)
    S[:, rows, cols] = q
    return S - S.transpose(1, 2)


class _Cayley(torch.autograd.Function):
    """``R = (I + Q)(I - Q)^{-1} = 2 M - I`` with ``M = (I - Q)^{-1}``; since ``dR = 2 M dQ M``, the gradient is
    ``dL/dQ = 2 M^T G M^T`` (one inverse forward, two small products backward)."""

    @staticmethod
    def forward(ctx, Q):
        eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
        M = torch.linalg.inv(eye - Q)
        ctx.save_for_backward(M)
        return 2 * M - eye

    @staticmethod
    def backward(ctx, G):
        (M,) = ctx.saved_tensors
        Mt = M.transpose(1, 2)
        return 2 * torch.bmm(torch.bmm(Mt, G), Mt)


def cayley(Q: torch.Tensor, variant: str = "exact", terms: int = 5) -> torch.Tensor:
    """``(I + Q)(I - Q)^{-1}`` per block, or its Neumann series with ``terms`` terms (see the module docstring)."""
    if variant == "exact":
        return _Cayley.apply(Q)
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device).expand_as(Q)
    R = eye.clone()
    if terms > 1:
        R = R + 2 * Q if terms > 2 else R + Q
        power = Q
        for k in range(2, terms):
            power = power @ Q
            R = R + (2 if k < terms - 1 else 1) * power
    return R


def rotate(x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``x R`` block by block: ``x`` (T x n b), ``R`` (n x b x b) -> (T x n b).

    Computed as ``(R^T x^T)^T``: one batched product of the small blocks with the *transposed view* of ``x`` (each
    block is b x T, so the product is b x b times b x T, a shape BLAS runs far faster than T x b times b x b), and
    the result is returned as a transposed (column-major) view, which the following matrix product reads as is."""
    n, b, _ = R.shape
    T = x.numel() // (n * b)
    xT = x.reshape(T, n * b).contiguous().t().view(n, b, T)
    return torch.bmm(R.transpose(1, 2), xT).view(n * b, T).t()


def rotate_t(x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``x R^T`` block by block."""
    return rotate(x, R.transpose(1, 2))


def block_grad(x: torch.Tensor, g: torch.Tensor, n: int) -> torch.Tensor:
    """``x_k^T g_k`` for each block ``k``: (n x b x b) from two (T x n b) tensors."""
    b = x.shape[-1] // n
    T = x.numel() // (n * b)
    return torch.bmm(x.reshape(T, n * b).contiguous().t().view(n, b, T), g.reshape(T, n, b).transpose(0, 1))


def rotate_weight(W: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``W R^T`` for a block-diagonal ``R`` (W: out x n b): each row of ``W`` is rotated like an input row."""
    return rotate_t(W, R)


class _RotatedLinear(torch.autograd.Function):
    """``(x R) W^T + b`` for a frozen ``W, b``; saves ``x`` and ``R`` only."""

    @staticmethod
    def forward(ctx, x, R, W, b):
        xr = rotate(x, R)
        out = torch.addmm(b, xr, W.t()) if b is not None else torch.mm(xr, W.t())
        ctx.save_for_backward(x, R, W)
        return out

    @staticmethod
    def backward(ctx, g):
        x, R, W = ctx.saved_tensors
        gr = torch.mm(g, W)
        # row-major for the elementwise backward ops upstream (GELU, residual sums), which are slow on a transposed view
        gx = rotate_t(gr, R).contiguous() if ctx.needs_input_grad[0] else None
        gR = block_grad(x, gr, R.shape[0]) if ctx.needs_input_grad[1] else None
        return gx, gR, None, None


def rotated_linear(x: torch.Tensor, R: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The frozen layer on the rotated input, ``(x R) W^T + b``, as one autograd node (``x``: tokens x in)."""
    return _RotatedLinear.apply(x, R, W, b)


# -- the delta -------------------------------------------------------------------------------------------------
class RotationDelta(Delta):
    """Block-diagonal Cayley rotation of the layer's input: ``y = (x R) W^T + b``, i.e. ``W' = W R^T``."""

    structure = "rotation"
    replaces_output = True
    acts_on_weight = True
    needs_base = True

    def __init__(self, out_features: int, in_features: int, block_size: int, cayley: str = "exact",
                 terms: int = 5, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(out_features, in_features)
        if block_size < 2 or in_features % block_size:
            raise ValueError(f"block_size {block_size} must be >= 2 and divide in_features={in_features}")
        if cayley not in CAYLEY:
            raise ValueError(f"unknown cayley variant {cayley!r}; choose one of {CAYLEY}")
        self.block_size, self.cayley, self.terms = int(block_size), cayley, int(terms)
        n = in_features // block_size
        rows, cols = torch.triu_indices(block_size, block_size, 1, device=device)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.q = nn.Parameter(torch.zeros(n, rows.numel(), dtype=dtype, device=device))

    @property
    def blocks(self) -> int:
        return self.q.shape[0]

    def skew(self) -> torch.Tensor:
        return skew(self.q, self.rows, self.cols, self.block_size)

    def rotation(self) -> torch.Tensor:
        """``R`` as (n x b x b) blocks."""
        return cayley(self.skew(), self.cayley, self.terms)

    # -- application ----------------------------------------------------------------------------------------
    def replace(self, x: torch.Tensor, embedding: bool = False) -> torch.Tensor:
        if embedding:
            raise NotImplementedError("OFT rotates a linear layer's input; it does not apply to embeddings")
        W, b = self.base_weight()
        R = self.rotation()
        x2 = x.reshape(-1, self.in_features)
        cast = fused_inputs(x2, W, b, R)
        if cast is not None:
            xc, Wc, bc, Rc = cast
            out = rotated_linear(xc, Rc, Wc, bc)
        else:
            out = F.linear(rotate(x2.to(R.dtype), R).to(W.dtype), W, b)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Contribution ``W (x R - x)`` (row vectors), used when another output-replacing delta is live."""
        W, _ = self.base_weight()
        x2 = x.reshape(-1, self.in_features).to(self.q.dtype)
        out = F.linear((rotate(x2, self.rotation()) - x2).to(W.dtype), W)
        return out.view(*x.shape[:-1], self.out_features)

    def add_to(self, out: torch.Tensor, x: torch.Tensor, inplace: bool = True) -> torch.Tensor:
        return out + self(x).to(out.dtype)

    # -- materialization and merging ----------------------------------------------------------------------------
    def dense(self) -> torch.Tensor:
        """``W (R^T - I)`` for the weight this delta is bound to (:meth:`Delta.bind`; it must not be merged into it),
        differentiable in ``q`` like every structure's ``dense()`` (layer kinds that apply ``dense()``, convolutions,
        train through it)."""
        if self.is_merged():
            raise RuntimeError("the additive form W (R^T - I) of a merged rotation is undefined; dt.unmerge it first")
        W = self.base_weight()[0].detach()
        R = self.rotation()
        return rotate_weight(W.to(R.dtype), R) - W.to(R.dtype)

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: float = 1.0) -> None:
        """``W <- W R_w^T`` for ``scale = w > 0``, or ``W <- W (R_w^T)^{-1}`` for ``scale = -w`` (unmerge), in place.
        ``R_w`` is the rotation of ``w q`` (``R`` itself for ``w = 1``): a merge weight scales the rotation angle."""
        Q = self.skew().detach().float() * abs(scale)
        R = cayley(Q, self.cayley, self.terms)
        if scale < 0:
            R = torch.linalg.inv(R)
        weight.copy_(rotate_weight(weight.float(), R).to(weight.dtype))

    # -- bookkeeping ------------------------------------------------------------------------------------------
    def spec(self) -> dict:
        return {**super().spec(), "block_size": self.block_size, "cayley": self.cayley, "terms": self.terms}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"q": self.q.detach()}

    @classmethod
    def from_spec(cls, spec: dict, tensors: dict[str, torch.Tensor]) -> "RotationDelta":
        q = tensors["q"]
        d = cls(spec["out_features"], spec["in_features"], spec["block_size"], spec.get("cayley", "exact"),
                spec.get("terms", 5), dtype=q.dtype)
        if q.shape != d.q.shape:
            raise ValueError(f"rotation tensor q has shape {tuple(q.shape)}, but the spec (in={spec['in_features']}, "
                             f"block_size={spec['block_size']}) needs {tuple(d.q.shape)}")
        with torch.no_grad():
            d.q.copy_(q)
        return d

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}, cayley={self.cayley}"
