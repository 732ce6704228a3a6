"""LoRA and its SVD-initialized family (PiSSA, MiLoRA, OLoRA).

LoRA (Hu et al., 2021): ``W' = W + s * B A`` with ``A`` (r x in), ``B`` (out x r), ``s = alpha / r``, or
``s = alpha / sqrt(r)`` with rsLoRA (Kalajdzievski, 2023). Default init: ``A ~ kaiming_uniform(a=sqrt(5))``,
``B = 0`` (so ``dW = 0`` at step 0); ``init="gaussian"`` draws ``A ~ N(0, 1/r^2)``.

Residual initializations take ``B0, A0`` from a factorization of ``W`` itself, so that
``s B0 A0`` is a chosen part of ``W`` and training starts on the residual ``W_res = W - s B0 A0``:

- PiSSA (Meng et al., 2024): the top-r singular triplets, ``A0 = diag(sqrt(S_r / s)) Vh_r``,
  ``B0 = U_r diag(sqrt(S_r / s))``; ``niter=k`` uses the randomized ``torch.svd_lowrank(W, q=r, niter=k)``.
- MiLoRA (Wang et al., 2024): the same with the bottom-r triplets (minor components).
- OLoRA (Buyukakyuz, 2024): ``W = Q R``; ``B0 = Q[:, :r]``, ``A0 = R[:r]``.

deltatune never rewrites ``W``: the delta is ``s (B A - B0 A0)`` (see :mod:`deltatune.deltas.lowrank`), which
gives the same outputs and gradients as training on ``W_res`` and saves as a plain LoRA of rank ``2r`` on the
original weights (``alpha' = 2 alpha``, or ``sqrt(2) alpha`` with rsLoRA, so ``s' = s``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..deltas import LowRankDelta
from ..targets import pattern_value
from .base import Method, adapter_dtype, check_dropout

OVERSAMPLE = 10
INITS = ("kaiming", "gaussian", "pissa", "milora", "olora")


# -- pure tensor math ----------------------------------------------------------------------------------------
def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def svd_triplets(W: torch.Tensor, r: int, which: str = "top", niter: int | None = None):
    """``(U_r, S_r, Vh_r)``: the top or bottom ``r`` singular triplets of ``W``, computed in float32.

    ``niter`` selects ``torch.svd_lowrank`` (randomized, top components only) with that many subspace iterations.
    It oversamples by ``OVERSAMPLE`` columns (PEFT asks for exactly ``q=r``), which makes the smallest of the
    ``r`` kept values accurate at almost no cost (Halko et al., 2011).
    """
    W = W.detach().float()
    if niter is not None:
        if which != "top":
            raise ValueError("randomized SVD (niter) finds top components only; use the full SVD for MiLoRA")
        U, S, V = torch.svd_lowrank(W, q=min(r + OVERSAMPLE, *W.shape), niter=niter)
        return U[:, :r], S[:r], V[:, :r].t()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    sl = slice(0, r) if which == "top" else slice(S.shape[0] - r, S.shape[0])
    return U[:, sl], S[sl], Vh[sl]


def split_triplets(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, s: float):
    """``(B, A)`` with ``s B A = U diag(S) Vh``: ``B = U diag(sqrt(S/s))``, ``A = diag(sqrt(S/s)) Vh``."""
    root = torch.sqrt(S / s)
    return U * root, root[:, None] * Vh


def qr_factors(W: torch.Tensor, r: int):
    """``(B, A) = (Q[:, :r], R[:r])`` from ``W = Q R`` (OLoRA)."""
    Q, R = torch.linalg.qr(W.detach().float())
    return Q[:, :r].contiguous(), R[:r].contiguous()


def init_factors(W: torch.Tensor, r: int, s: float, init: str, niter: int | None = None):
    """``(B0, A0)`` for a residual init, or ``None`` for the zero-delta inits (kaiming, gaussian)."""
    if init == "pissa":
        return split_triplets(*svd_triplets(W, r, "top", niter), s)
    if init == "milora":
        return split_triplets(*svd_triplets(W, r, "bottom"), s)
    if init == "olora":
        return qr_factors(W, r)
    return None


# -- the method ---------------------------------------------------------------------------------------------
@dataclass
class LoRA(Method):
    """Low-rank adaptation. ``alpha`` defaults to ``r`` (scale 1). ``rank_pattern`` / ``alpha_pattern`` override
    ``r`` / ``alpha`` for modules whose name matches a key (suffix or full regex)."""

    name = "lora"

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    init: str = "kaiming"
    niter: int | None = None
    use_rslora: bool = False
    rank_pattern: dict | None = None
    alpha_pattern: dict | None = None

    def validate(self) -> None:
        ranks = [self.r, *(self.rank_pattern or {}).values()]
        if any(not isinstance(r, int) or r <= 0 for r in ranks):
            raise ValueError(f"LoRA rank must be a positive integer, got r={self.r} "
                             f"rank_pattern={self.rank_pattern}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of {INITS}")
        check_dropout(self.dropout)
        if self.niter is not None and self.init != "pissa":
            raise ValueError("niter (randomized SVD) applies to init='pissa' only")

    def rank_alpha(self, module_name: str) -> tuple[int, float]:
        r = pattern_value(module_name, self.rank_pattern, self.r)
        alpha = pattern_value(module_name, self.alpha_pattern, self.alpha if self.alpha is not None else r)
        return r, alpha

    def build(self, module_name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> LowRankDelta:
        out_f, in_f = weight.shape
        r, alpha = self.rank_alpha(module_name)
        if self.init in ("pissa", "milora", "olora") and r > min(out_f, in_f):
            raise ValueError(f"{module_name}: rank {r} exceeds min(out, in) = {min(out_f, in_f)} "
                             f"for init={self.init!r}")
        s = lora_scale(alpha, r, self.use_rslora)
        residual = init_factors(weight, r, s, self.init, self.niter)
        delta = LowRankDelta(out_f, in_f, r, s, self.dropout, dtype=adapter_dtype(weight), device=weight.device,
                             anchored=residual is not None)
        with torch.no_grad():
            if residual is not None:
                B0, A0 = residual
                for dst, src in ((delta.A, A0), (delta.A0, A0), (delta.B, B0), (delta.B0, B0)):
                    dst.copy_(src)
            elif self.init == "gaussian":
                nn.init.normal_(delta.A, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(delta.A, a=math.sqrt(5))
        return delta


@dataclass
class PiSSA(LoRA):
    """LoRA initialized on the principal singular components (``niter`` for fast randomized SVD)."""

    name = "pissa"
    init: str = "pissa"


@dataclass
class MiLoRA(LoRA):
    """LoRA initialized on the minor singular components."""

    name = "milora"
    init: str = "milora"


@dataclass
class OLoRA(LoRA):
    """LoRA initialized from the QR decomposition of the weight."""

    name = "olora"
    init: str = "olora"
