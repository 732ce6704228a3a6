"""Low-rank delta: ``dW = s * (B @ A - B0 @ A0)``.

- ``A`` (r x in) is the input-side ("down") factor, ``B`` (out x r) the output-side ("up") factor, PEFT naming.
- ``s`` is the scale: ``alpha / r`` (LoRA) or ``alpha / sqrt(r)`` (rsLoRA).
- ``A0, B0`` are an optional frozen *anchor*: the factors at initialization for residual initializations
  (PiSSA, MiLoRA, OLoRA). With the anchor, ``W + dW = (W - s B0 A0) + s B A``, i.e. exactly the paper's
  "train B, A on the residual ``W_res``", but the user's weight ``W`` is never modified, several residual
  adapters can live on one base, and the delta is always a plain low-rank update of the original ``W``
  (:meth:`LowRankDelta.factors` returns it as rank ``2r`` factors ``[B | -B0]``, ``[A ; A0]``). Checkpoints store
  those factors with the spec key ``r_anchor = r`` (the trailing ``r`` components are the frozen anchor, ``B0`` with
  its sign flipped), so a reloaded adapter trains the same ``r`` components as before (a spec without ``r_anchor``,
  from an older deltatune or from PEFT, loads as a plain LoRA of rank ``2r``).

The unmerged forward never forms ``dW``: ``y = x W^T + b + s * (x A^T) B^T``. When this delta is the only one live
on a plain frozen linear layer, the whole layer runs as one autograd node (:func:`lowrank_linear`); otherwise the
update is added into the base layer's output (:func:`lowrank_apply`, in place when that output owns its storage).
Both spell out the backward so that every product keeps a BLAS-friendly orientation; without dropout the fused
node allocates nothing of the size of the activations beyond what the frozen layer itself needs (``g = dL/dy``,
``u^T = s B^T g^T``)::

    dL/dA = u^T x            (r x in)
    dL/dB = s (xa^T g)^T     (out x r; computed as r x out, the fast orientation for a tall g)
    dL/dx = g W + u A        (fused: one mm plus an in-place addmm)
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import Delta, fused_inputs

#: the PEFT LoRA tensor names per layer kind (``lora_A`` / ``lora_B`` of a Linear or GPT-2 Conv1D, the parameters
#: ``lora_embedding_A`` / ``lora_embedding_B`` of an embedding); kinds not listed use :data:`PEFT_LORA_DEFAULT`
PEFT_LORA_KEYS = {"embedding": ("lora_embedding_A", "lora_embedding_B")}
PEFT_LORA_DEFAULT = ("lora_A.weight", "lora_B.weight")
#: layer kinds that store their weight in x out and that PEFT adapts as a Linear with ``fan_in_fan_out`` (GPT-2's
#: Conv1D); the A/B tensors are the same either way
PEFT_FAN_IN_FAN_OUT = ("conv1d",)


def _factor_grads(g2, xd2, xa, A, B, s, need_A, need_B, need_u):
    """``(u^T, dL/dA, dL/dB)`` of ``y += s (xd A^T) B^T`` for ``g2 = dL/dy`` (tokens x out); each None when not
    needed (``u^T`` is needed for the input gradient)."""
    gB = torch.mm(xa.t(), g2).mul_(s).t().contiguous() if need_B else None
    uT = torch.mm(B.t().contiguous(), g2.t()).mul_(s) if need_A or need_u else None  # faster than g2 @ B
    gA = torch.mm(uT, xd2) if need_A else None
    return uT, gA, gB


class _LowRankAdd(torch.autograd.Function):
    """``out + s * (x A^T) B^T``, written into ``out`` when it owns its storage."""

    @staticmethod
    def forward(ctx, out, x, A, B, s, inplace):
        x2 = x.reshape(-1, A.shape[1])
        xa = x2 @ A.t()
        if inplace:
            out.view(-1, B.shape[0]).addmm_(xa, B.t(), alpha=s)
            ctx.mark_dirty(out)
        else:
            out = torch.addmm(out.reshape(-1, B.shape[0]), xa, B.t(), alpha=s).view(out.shape)
        ctx.save_for_backward(x2, A, B, xa)
        ctx.s, ctx.x_shape = s, x.shape
        return out

    @staticmethod
    def backward(ctx, g):
        x2, A, B, xa = ctx.saved_tensors
        need_out, need_x, need_A, need_B = ctx.needs_input_grad[:4]
        uT, gA, gB = _factor_grads(g.reshape(-1, B.shape[0]), x2, xa, A, B, ctx.s, need_A, need_B, need_x)
        gx = torch.mm(uT.t(), A).view(ctx.x_shape) if need_x else None
        return (g if need_out else None), gx, gA, gB, None, None


def lowrank_apply(out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float,
                  inplace: bool = True) -> torch.Tensor:
    """``out + s * (x @ A^T) @ B^T`` over flattened leading dims. With ``inplace`` and ``out`` a contiguous tensor
    that owns its storage (not a view: autograd would then copy the whole base on backward), the sum is written
    into ``out``, which must not be used afterwards; the base layers' backward never needs their output."""
    inplace = inplace and out.is_contiguous() and out._base is None
    return _LowRankAdd.apply(out, x, A, B, float(s), inplace)


class _LowRankLinear(torch.autograd.Function):
    """``x W^T + b + s * (xd A^T) B^T`` for a frozen ``W, b``; ``xd`` is the dropout of ``x``, or ``None`` for ``x``
    itself (never the same tensor twice: ``torch.compile`` breaks the graph on duplicate inputs of a Function)."""

    @staticmethod
    def forward(ctx, x, xd, W, b, A, B, s):
        same = xd is None
        xd = x if same else xd
        out = torch.addmm(b, x, W.t()) if b is not None else torch.mm(x, W.t())
        xa = xd @ A.t()
        out.addmm_(xa, B.t(), alpha=s)
        ctx.save_for_backward(xd, W, A, B, xa)
        ctx.s, ctx.same = s, same
        return out

    @staticmethod
    def backward(ctx, g):
        xd, W, A, B, xa = ctx.saved_tensors
        need_x, need_xd, _, _, need_A, need_B = ctx.needs_input_grad[:6]
        uT, gA, gB = _factor_grads(g, xd, xa, A, B, ctx.s, need_A, need_B, need_x or need_xd)
        gx = gxd = None
        if ctx.same:  # one input gradient for both paths, accumulated in place
            gx = torch.mm(g, W).addmm_(uT.t(), A) if need_x else None
        else:
            gx = torch.mm(g, W) if need_x else None
            gxd = torch.mm(uT.t(), A) if need_xd else None
        return gx, gxd, None, None, gA, gB, None


def lowrank_linear(x, xd, W, b, A, B, s: float) -> torch.Tensor:
    """The frozen linear layer plus its low-rank update, ``x W^T + b + s (xd A^T) B^T``, as one autograd node.
    ``x``, ``xd``: (tokens x in), ``xd`` the input of the low-rank path (its dropout; ``x`` itself is passed as
    ``None``); ``W``: (out x in) without gradient; ``b``: (out,) or None."""
    return _LowRankLinear.apply(x, None if xd is x else xd, W, b, A, B, float(s))


class FactoredDelta(Delta):
    """Any update that is a product ``dW = s * B' @ A'`` of factors built from the module's parameters
    (:meth:`factors`). The application paths, ``dense()`` and the PEFT LoRA export are shared; subclasses only say
    how their parameters make ``(B', A')``."""

    scale: float
    dropout: nn.Module | None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B', A')``: (out x r') and (r' x in) with ``dW = s * B' @ A'``."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    def lowrank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(B', A', s)`` as plain tensors: the exact LoRA this delta is (used to export to PEFT)."""
        B, A = self.factors()
        return B.detach().contiguous(), A.detach().contiguous(), self.scale

    @property
    def dropout_p(self) -> float:
        """The input dropout probability (0 without dropout)."""
        return float(self.dropout.p) if self.dropout is not None else 0.0

    def spec(self) -> dict:
        """The base spec plus ``dropout`` when there is one (so a reloaded adapter trains with it)."""
        p = self.dropout_p
        return {**super().spec(), **({"dropout": p} if p > 0 else {})}

    def live_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        B, A = self.factors()
        return B, A, self.scale

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        return self._input(x)

    # -- application ----------------------------------------------------------------------------------------
    def _input(self, x: torch.Tensor) -> torch.Tensor:
        x = x if x.dtype == self.dtype else x.to(self.dtype)
        return self.dropout(x) if self.dropout is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, A = self.factors()
        return F.linear(F.linear(self._input(x), A), B) * self.scale

    def add_to(self, out: torch.Tensor, x: torch.Tensor, inplace: bool = True) -> torch.Tensor:
        if out.dtype != self.dtype:  # half-precision base (or autocast) with fp32 adapter: add in out's dtype
            return out + self(x).to(out.dtype)
        B, A = self.factors()
        return lowrank_apply(out, self._input(x), A, B, self.scale, inplace)

    def fuse(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        B, A = self.factors()
        cast = fused_inputs(x, weight, bias, A, B)
        if cast is None:
            return None
        x, weight, bias, A, B = cast
        xd = self.dropout(x) if self.dropout is not None else x
        return lowrank_linear(x, xd, weight, bias, A, B, self.scale)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        B, A = self.factors()
        return F.embedding(ids, A.t()) @ B.t() * self.scale

    def dense(self) -> torch.Tensor:
        B, A = self.factors()
        return (B @ A) * self.scale


class LowRankDelta(FactoredDelta):
    """``dW = s * (B A - B0 A0)`` with trainable ``A`` (r x in), ``B`` (out x r) and an optional frozen anchor."""

    structure = "lowrank"

    def __init__(
        self,
        out_features: int,
        in_features: int,
        r: int,
        scale: float,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        anchored: bool = False,
    ):
        super().__init__(out_features, in_features)
        if r <= 0:
            raise ValueError(f"rank r must be a positive integer, got r={r}")
        self.r = int(r)
        self.scale = float(scale)
        self.A = nn.Parameter(torch.zeros(r, in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        if anchored:
            self.register_buffer("A0", torch.zeros(r, in_features, dtype=dtype, device=device))
            self.register_buffer("B0", torch.zeros(out_features, r, dtype=dtype, device=device))
        else:
            self.A0 = self.B0 = None

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    # -- the equivalent plain factors ---------------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B', A')`` with ``dW = s * B' @ A'``: ``(B, A)``, or ``([B | -B0], [A ; A0])`` when anchored."""
        if self.A0 is None:
            return self.B, self.A
        return torch.cat([self.B, -self.B0], dim=1), torch.cat([self.A, self.A0], dim=0)

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def spec(self) -> dict:
        """Described as a plain low-rank update of the original weight (anchor folded into the factors), with
        ``r_anchor``: how many trailing components of those factors are the frozen anchor."""
        B, _ = self.factors()
        anchor = {"r_anchor": self.r} if self.A0 is not None else {}
        return {**super().spec(), "r": int(B.shape[1]), "scale": self.scale, **anchor}

    @classmethod
    def spec_for(cls, out_features: int, in_features: int, r: int, scale: float, layer: str | None = None) -> dict:
        """The spec of a plain rank-``r`` LoRA ``dW = scale * B A`` (no anchor) on a ``layer`` kind."""
        return super().spec_for(out_features, in_features, layer, r=int(r), scale=scale)

    def tensors(self) -> dict[str, torch.Tensor]:
        B, A = self.factors()
        return {"A": A.detach().contiguous(), "B": B.detach().contiguous()}

    @classmethod
    def from_spec(cls, spec: dict, tensors: dict[str, torch.Tensor]) -> "LowRankDelta":
        """Rebuild from the folded factors; with ``r_anchor = k`` the last ``k`` components become the frozen anchor
        ``A0 = A[-k:]``, ``B0 = -B[:, -k:]`` and the first ``r - k`` the trainable ``A``, ``B``."""
        A, B = tensors["A"], tensors["B"]
        r, k = int(spec["r"]), int(spec.get("r_anchor", 0))
        if A.shape != (r, spec["in_features"]) or B.shape != (spec["out_features"], r):
            raise ValueError(
                f"low-rank tensors have shapes A{tuple(A.shape)}, B{tuple(B.shape)}, but the spec says r={r}, "
                f"in={spec['in_features']}, out={spec['out_features']}"
            )
        if k and 2 * k != r:
            raise ValueError(f"spec key 'r_anchor' is {k}, but an anchored low-rank delta of r={r} has r_anchor {r // 2}")
        d = cls(spec["out_features"], spec["in_features"], r - k, spec["scale"], dropout=spec.get("dropout", 0.0),
                dtype=A.dtype, anchored=k > 0)
        with torch.no_grad():
            d.A.copy_(A[: r - k])
            d.B.copy_(B[:, : r - k])
            if k:
                d.A0.copy_(A[r - k:])
                d.B0.copy_(-B[:, r - k:])
        return d

    # -- PEFT LoRA checkpoints ---------------------------------------------------------------------------------
    @staticmethod
    def peft_keys(kind: str | None) -> tuple[str, str]:
        """The PEFT tensor names ``(A, B)`` of a LoRA on a ``kind`` layer (:data:`PEFT_LORA_KEYS`)."""
        return PEFT_LORA_KEYS.get(kind, PEFT_LORA_DEFAULT)

    @classmethod
    def peft_names(cls) -> tuple[str, ...]:
        """Every tensor name (after the module's) that a PEFT LoRA checkpoint uses for this structure."""
        return tuple(dict.fromkeys([*PEFT_LORA_DEFAULT, *(n for ab in PEFT_LORA_KEYS.values() for n in ab)]))

    @classmethod
    def from_peft(cls, mod: str, found: dict[str, torch.Tensor], kind: str | None, rank: int | None,
                  scale: Callable[[int], float], source: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """``(spec, tensors)`` of module ``mod`` from its PEFT LoRA tensors ``found`` (``{name: tensor}`` with the
        names of :meth:`peft_names`); ``kind``: the target layer's kind (``None``: unknown, read from the tensor
        names where only one kind uses them); ``rank``: the rank the config gives the module, which the tensors
        must have; ``scale(r)``: the config's scale for rank ``r``."""
        if kind is None:
            kind = next((k for k, names in PEFT_LORA_KEYS.items() if set(found) <= set(names)), None)
        t = {("A" if "A" in k else "B"): v for k, v in found.items()}
        if set(t) != {"A", "B"}:
            raise ValueError(f"{source}: PEFT checkpoint has an incomplete LoRA for {mod!r} (found {sorted(t)})")
        r = t["A"].shape[0]
        if t["A"].dim() != 2 or t["B"].dim() != 2:
            raise ValueError(f"{source}: module {mod!r} has LoRA tensors A {tuple(t['A'].shape)}, B "
                             f"{tuple(t['B'].shape)}, which are not 2-D factors of a {kind or 'linear'} layer's LoRA "
                             "(a convolution's LoRA for a layer of another type?): is the file for another model?")
        if t["B"].shape[1] != r or (rank is not None and r != rank):
            raise ValueError(f"{source}: module {mod!r} has LoRA tensors A {tuple(t['A'].shape)}, B "
                             f"{tuple(t['B'].shape)} but its config gives rank {rank} (r / rank_pattern); the "
                             "weights and the config are not from the same save (a torn or mixed checkpoint)")
        return cls.spec_for(t["B"].shape[0], t["A"].shape[1], r, scale(r), layer=kind), t

    def extra_repr(self) -> str:
        anchor = ", anchored" if self.A0 is not None else ""
        return f"{super().extra_repr()}, r={self.r}, scale={self.scale:g}{anchor}"
