"""LoRA and its SVD-initialized family (PiSSA, MiLoRA, OLoRA), and the data-aware CorDA and EVA
(:mod:`deltatune.methods.datainit`).

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
INITS = ("kaiming", "gaussian", "pissa", "milora", "olora", "corda_ipa", "corda_kpa", "eva")
DATA_INITS = ("corda_ipa", "corda_kpa", "eva")  # need calibration data at attach (dt.attach(..., data=batches))


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
    calibration: str | None = None  # CorDA: a dt.calibrate(..., stats=("corda",), cache=FILE) file instead of data
    eva_rho: float = 2.0
    eva_tau: float = 0.99
    max_batches: int | None = None  # calibration batches to use (CorDA, EVA)

    def validate(self) -> None:
        ranks = [self.r, *(self.rank_pattern or {}).values()]
        if any(not isinstance(r, int) or r <= 0 for r in ranks):
            raise ValueError(f"LoRA rank must be a positive integer, got r={self.r!r} "
                             f"rank_pattern={self.rank_pattern!r}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of {INITS}")
        check_dropout(self.dropout)
        if self.niter is not None and self.init != "pissa":
            raise ValueError("niter (randomized SVD) applies to init='pissa' only")
        if self.eva_rho < 1 or not 0 < self.eva_tau <= 1:
            raise ValueError(f"EVA needs eva_rho >= 1 and eva_tau in (0, 1], got {self.eva_rho}, {self.eva_tau}")

    def rank_alpha(self, module_name: str) -> tuple[int, float]:
        r = pattern_value(module_name, self.rank_pattern, self.r)
        alpha = pattern_value(module_name, self.alpha_pattern, self.alpha if self.alpha is not None else r)
        return r, alpha

    def build(self, module_name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> LowRankDelta:
        out_f, in_f = weight.shape
        r, alpha = self.rank_alpha(module_name)
        if self.init in DATA_INITS:
            raise ValueError(f"init={self.init!r} needs calibration data: dt.attach(model, method, data=batches)")
        if self.init in ("pissa", "milora", "olora") and r > min(out_f, in_f):
            raise ValueError(f"{module_name}: rank {r} exceeds min(out, in) = {min(out_f, in_f)} "
                             f"for init={self.init!r}")
        s = lora_scale(alpha, r, self.use_rslora)
        return self._delta(weight, r, s, init_factors(weight, r, s, self.init, self.niter))

    def _delta(self, weight: torch.Tensor, r: int, s: float, residual=None, A: torch.Tensor | None = None):
        """A LoRA of rank ``r``: anchored on ``residual = (B0, A0)``, or ``A`` given with ``B = 0``, or the default
        random ``A``."""
        out_f, in_f = weight.shape
        delta = LowRankDelta(out_f, in_f, r, s, self.dropout, dtype=adapter_dtype(weight), device=weight.device,
                             anchored=residual is not None)
        with torch.no_grad():
            if residual is not None:
                B0, A0 = residual
                for dst, src in ((delta.A, A0), (delta.A0, A0), (delta.B, B0), (delta.B0, B0)):
                    dst.copy_(src)
            elif A is not None:
                delta.A.copy_(A)
            elif self.init == "gaussian":
                nn.init.normal_(delta.A, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(delta.A, a=math.sqrt(5))
        return delta

    def build_all(self, model: nn.Module, layers: dict, data=None) -> dict:
        if self.init not in DATA_INITS:
            return super().build_all(model, layers, data)
        from ..calibration import calibrate, load_calibration
        from .datainit import allocate_ranks, corda_factors

        names = list(layers)
        if self.init.startswith("corda"):
            if data is None and self.calibration is None:
                raise ValueError(f"init={self.init!r} needs calibration data: dt.attach(model, method, data=batches) "
                                 "or calibration='file' from dt.calibrate(..., stats=('corda',), cache='file')")
            cal = load_calibration(self.calibration) if data is None else \
                calibrate(model, data, targets=names, stats=("corda",), max_batches=self.max_batches)
            out = {}
            for n, (w, _) in layers.items():
                if n not in cal or "corda" not in cal[n].sums:
                    raise ValueError(f"the calibration has no CorDA statistic for {n!r}")
                r, alpha = self.rank_alpha(n)
                if r > min(w.shape):
                    raise ValueError(f"{n}: rank {r} exceeds min(out, in) = {min(w.shape)} for init={self.init!r}")
                s = lora_scale(alpha, r, self.use_rslora)
                out[n] = self._delta(w, r, s, corda_factors(w, cal[n].corda_matrix(), r, s, self.init[-3:]))
            return out
        if data is None:
            raise ValueError("init='eva' needs calibration data: dt.attach(model, method, data=batches)")
        wanted = {n: min(round(self.eva_rho * self.rank_alpha(n)[0]), min(layers[n][0].shape)) for n in names}
        budget = sum(self.rank_alpha(n)[0] for n in names)
        comps = eva_components(model, data, wanted, budget, self.eva_tau, self.max_batches)
        ranks = allocate_ranks({n: ratios for n, (_, ratios) in comps.items()}, budget)
        out = {}
        for n, (w, _) in layers.items():
            if ranks[n] == 0:
                continue  # EVA gives this layer no rank: no adapter there
            r, alpha = self.rank_alpha(n)
            s = lora_scale(alpha, r, self.use_rslora)  # alpha_layer = alpha k / r: the scale stays alpha / r
            out[n] = self._delta(w, ranks[n], s, A=comps[n][0][: ranks[n]].to(w.dtype))
        return out


def eva_components(model: nn.Module, data, wanted: dict[str, int], budget: int, tau: float = 0.99,
                   max_batches=None, max_epochs: int = 4) -> dict:
    """``{layer: (components (k x in), explained-variance ratios (k,))}``: the PCA of each layer's inputs, refined
    batch by batch until, for every layer, the components it would receive from the ``budget`` now
    (:func:`deltatune.methods.datainit.allocate_ranks`) are stable (``|cos| >= tau`` with the previous batch's),
    cycling over ``data`` at most ``max_epochs`` times. Layers that see one input share one PCA."""
    import warnings

    from ..calibration import calibrate
    from .datainit import allocate_ranks, converged, pca

    totals: dict[tuple, list] = {}  # input group -> [sum x x^T, sum x, tokens]
    result: dict[str, tuple] = {}
    done: set[tuple] = set()
    data = list(data)
    seen = 0
    for _ in range(max_epochs):
        for batch in data:
            if max_batches is not None and seen >= max_batches:
                break
            seen += 1
            pending = [n for n in wanted if not any(n in g for g in done)]
            if not pending:
                break
            cal = calibrate(model, [batch], targets=pending, stats=("cov", "mean"), verbose=False)
            previous = {}
            for stats in {id(v): v for v in cal.values()}.values():
                group = tuple(stats.modules)
                acc = totals.setdefault(group, [0, 0, 0])
                acc[0], acc[1], acc[2] = acc[0] + stats.sums["cov"], acc[1] + stats.sums["mean"], acc[2] + stats.tokens
                comps, ratios = pca(acc[0] / acc[2], acc[1] / acc[2], max(wanted[n] for n in group))
                previous[group] = result[group[0]][0] if group[0] in result else None
                for n in group:
                    result[n] = (comps[: wanted[n]].float(), ratios[: wanted[n]].float())
            # a layer has converged when the components it would get now (after redistribution) are stable
            needed = allocate_ranks({n: r for n, (_, r) in result.items()}, budget)
            for group, prev in previous.items():
                k = max(needed[n] for n in group)
                if prev is not None and (k == 0 or converged(prev[:k], result[group[0]][0][:k], tau)):
                    done.add(group)
        else:
            continue
        break
    unstable = [n for n in wanted if not any(n in g for g in done)]
    if unstable:
        warnings.warn(f"EVA: the components of {len(unstable)} layers (e.g. {unstable[0]}) did not converge to cosine "
                      f">= {tau} on the calibration data; using them as they are (give more data)", stacklevel=3)
    return result


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
class CorDA(LoRA):
    """LoRA initialized on the context-oriented decomposition of ``W`` (``init="corda_ipa"``: top components from
    task data; ``"corda_kpa"``: bottom components, from data whose knowledge is to be kept)."""

    name = "corda"
    init: str = "corda_ipa"


@dataclass
class EVA(LoRA):
    """LoRA with ``A`` = the top principal directions of each layer's inputs, ranks redistributed by explained
    variance (``eva_rho``, ``eva_tau``), ``B = 0``."""

    name = "eva"
    init: str = "eva"


@dataclass
class OLoRA(LoRA):
    """LoRA initialized from the QR decomposition of the weight."""

    name = "olora"
    init: str = "olora"
