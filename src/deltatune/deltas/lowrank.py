"""Low-rank delta: ``dW = s * (B @ A - B0 @ A0)``.

- ``A`` (r x in) is the input-side ("down") factor, ``B`` (out x r) the output-side ("up") factor, PEFT naming.
- ``s`` is the scale: ``alpha / r`` (LoRA) or ``alpha / sqrt(r)`` (rsLoRA).
- ``A0, B0`` are an optional frozen *anchor*: the factors at initialization for residual initializations
  (PiSSA, MiLoRA, OLoRA). With the anchor, ``W + dW = (W - s B0 A0) + s B A``, i.e. exactly the paper's
  "train B, A on the residual ``W_res``", but the user's weight ``W`` is never modified, several residual
  adapters can live on one base, and the delta is always a plain low-rank update of the original ``W``
  (:meth:`LowRankDelta.factors` returns it as rank ``2r`` factors ``[B | -B0]``, ``[A ; A0]``).

The unmerged forward never forms ``dW``: ``y = base(x) + s * (x A^T) B^T``, with the scale and the addition fused
into one ``addmm`` kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Delta


def lowrank_apply(out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """``out + s * (x @ A^T) @ B^T`` as one ``mm`` and one fused ``addmm`` over flattened leading dims."""
    lead = out.shape[:-1]
    xa = x.reshape(-1, A.shape[1]) @ A.t()
    y = torch.addmm(out.reshape(-1, B.shape[0]), xa, B.t(), alpha=s)
    return y.view(*lead, B.shape[0])


class LowRankDelta(Delta):
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

    # -- the equivalent plain factors ---------------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B', A')`` with ``dW = s * B' @ A'``: ``(B, A)``, or ``([B | -B0], [A ; A0])`` when anchored."""
        if self.A0 is None:
            return self.B, self.A
        return torch.cat([self.B, -self.B0], dim=1), torch.cat([self.A, self.A0], dim=0)

    # -- application ----------------------------------------------------------------------------------------
    def _input(self, x: torch.Tensor) -> torch.Tensor:
        x = x if x.dtype == self.A.dtype else x.to(self.A.dtype)
        return self.dropout(x) if self.dropout is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, A = self.factors()
        return F.linear(F.linear(self._input(x), A), B) * self.scale

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if out.dtype != self.A.dtype:  # half-precision base with fp32 adapter: add in the output's dtype
            return out + self(x).to(out.dtype)
        B, A = self.factors()
        return lowrank_apply(out, self._input(x), A, B, self.scale)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        B, A = self.factors()
        return F.embedding(ids, A.t()) @ B.t() * self.scale

    def dense(self) -> torch.Tensor:
        B, A = self.factors()
        return (B @ A) * self.scale

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def spec(self) -> dict:
        """Always described as a plain low-rank update of the original weight (anchor folded into the factors)."""
        B, _ = self.factors()
        return {**super().spec(), "r": int(B.shape[1]), "scale": self.scale}

    def tensors(self) -> dict[str, torch.Tensor]:
        B, A = self.factors()
        return {"A": A.detach().contiguous(), "B": B.detach().contiguous()}

    @classmethod
    def from_spec(cls, spec: dict, tensors: dict[str, torch.Tensor]) -> "LowRankDelta":
        A, B = tensors["A"], tensors["B"]
        r = int(spec["r"])
        if A.shape != (r, spec["in_features"]) or B.shape != (spec["out_features"], r):
            raise ValueError(
                f"low-rank tensors have shapes A{tuple(A.shape)}, B{tuple(B.shape)}, but the spec says r={r}, "
                f"in={spec['in_features']}, out={spec['out_features']}"
            )
        d = cls(spec["out_features"], spec["in_features"], r, spec["scale"], dropout=spec.get("dropout", 0.0),
                dtype=A.dtype)
        with torch.no_grad():
            d.A.copy_(A)
            d.B.copy_(B)
        return d

    def extra_repr(self) -> str:
        anchor = ", anchored" if self.A0 is not None else ""
        return f"{super().extra_repr()}, r={self.r}, scale={self.scale:g}{anchor}"
