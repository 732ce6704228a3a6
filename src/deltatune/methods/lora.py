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

Every ``init=`` is a registered :class:`Initializer` (:func:`register_init`) that declares the calibration
statistics it needs; the options of the data-aware ones are fields of :class:`CorDA` (``calibration``,
``max_batches``) and :class:`EVA` (``eva_rho``, ``eva_tau``, ``max_batches``), and a plain ``LoRA(init=...)`` gets
their defaults. Adapter configs saved while those fields sat on every LoRA still load: :meth:`Method.from_dict`
ignores fields a method does not have.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibration import STATS, calibrate, load_calibration
from ..deltas import LowRankDelta
from ..targets import pattern_value
from .base import Method, adapter_dtype, check_dropout
from .datainit import allocate_ranks, converged, corda_factors, pca
from .peft import LORA_KEYS

OVERSAMPLE = 10


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


# -- initializers: one registered strategy per init= name ------------------------------------------------------
@dataclass(frozen=True)
class Initializer:
    """How a LoRA ``dW = s (B A - B0 A0)`` starts, for one ``init=`` name.

    ``start(W, r, s, method, stats)`` returns the start of one layer of weight ``W`` (out x in) at rank ``r`` and
    scale ``s``, as ``kind`` says: ``"residual"``: ``(B0, A0)``, a part ``s B0 A0`` of ``W`` frozen as the anchor
    with ``B = B0``, ``A = A0`` (``dW = 0``; needs ``r <= min(out, in)``); ``"A"``: ``A`` with ``B = 0``;
    ``"random"``: ``f`` with ``f(A)`` filling ``A`` in place, ``B = 0``. ``stats``: the calibration statistics (:data:`deltatune.calibration.STATS`) it needs per layer,
    computed at attach from ``data=`` batches or read from the method's ``calibration`` file, and handed to
    ``start`` as the layer's :class:`~deltatune.calibration.LayerStats` (``None`` without ``stats``). ``options``:
    the method fields it reads, with the value a plain ``dt.LoRA(init=name)`` gets (the fields live on the method
    classes named after the initializer, e.g. :class:`CorDA`). ``build_all(method, model, layers, data)``, when
    given, builds every layer's delta itself (initializers that decide ranks across layers: EVA)."""

    name: str
    start: Callable | None = None
    kind: str = "random"
    stats: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)
    build_all: Callable | None = None

    @property
    def needs_data(self) -> bool:
        return bool(self.stats)

    def option(self, method: "LoRA", key: str):
        """``method.key`` when the method has that field, else this initializer's default for it."""
        return getattr(method, key, self.options[key])


_INITS: dict[str, Initializer] = {}


def register_init(init: Initializer) -> Initializer:
    """Make ``init.name`` a valid ``init=`` of every LoRA-family method."""
    if set(init.stats) - set(STATS):
        raise ValueError(f"initializer {init.name!r} asks for unknown statistics {sorted(set(init.stats) - set(STATS))}")
    _INITS[init.name] = init
    return init


def initializer(name: str) -> Initializer:
    if name not in _INITS:
        raise ValueError(f"unknown init {name!r}; choose one of {tuple(_INITS)}")
    return _INITS[name]


def _kaiming(W, r, s, method, stats):
    return lambda A: nn.init.kaiming_uniform_(A, a=math.sqrt(5))


def _gaussian(W, r, s, method, stats):
    return lambda A: nn.init.normal_(A, std=1.0 / r)


def _pissa(W, r, s, method, stats):
    return split_triplets(*svd_triplets(W, r, "top", method.niter), s)


def _milora(W, r, s, method, stats):
    return split_triplets(*svd_triplets(W, r, "bottom"), s)


def _olora(W, r, s, method, stats):
    return qr_factors(W, r)


def _corda(mode: str):
    def start(W, r, s, method, stats):
        return corda_factors(W, stats.corda_matrix(), r, s, mode)
    return start


CORDA_OPTIONS = {"calibration": None, "max_batches": None}
EVA_OPTIONS = {"eva_rho": 2.0, "eva_tau": 0.99, "max_batches": None}

for _init in (Initializer("kaiming", _kaiming), Initializer("gaussian", _gaussian),
              Initializer("pissa", _pissa, "residual"), Initializer("milora", _milora, "residual"),
              Initializer("olora", _olora, "residual"),
              Initializer("corda_ipa", _corda("ipa"), "residual", stats=("corda",), options=CORDA_OPTIONS),
              Initializer("corda_kpa", _corda("kpa"), "residual", stats=("corda",), options=CORDA_OPTIONS)):
    register_init(_init)
# -- the method ---------------------------------------------------------------------------------------------
@dataclass
class LoRA(Method):
    """Low-rank adaptation. ``alpha`` defaults to ``r`` (scale 1). ``rank_pattern`` / ``alpha_pattern`` override
    ``r`` / ``alpha`` for modules whose name matches a key (suffix or full regex). ``init``: a registered
    :class:`Initializer` (:func:`register_init`)."""

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
            raise ValueError(f"LoRA rank must be a positive integer, got r={self.r!r} "
                             f"rank_pattern={self.rank_pattern!r}")
        initializer(self.init)
        check_dropout(self.dropout)
        if self.niter is not None and self.init != "pissa":
            raise ValueError("niter (randomized SVD) applies to init='pissa' only")

    def rank_alpha(self, module_name: str) -> tuple[int, float]:
        r = pattern_value(module_name, self.rank_pattern, self.r)
        alpha = pattern_value(module_name, self.alpha_pattern, self.alpha if self.alpha is not None else r)
        return r, alpha

    def scale_of(self, module_name: str) -> tuple[int, float]:
        """``(r, s)`` of one module: its rank and ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
        r, alpha = self.rank_alpha(module_name)
        return r, lora_scale(alpha, r, self.use_rslora)

    def build(self, module_name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> LowRankDelta:
        init = initializer(self.init)
        if init.needs_data or init.build_all is not None:
            raise ValueError(f"init={self.init!r} needs calibration data: dt.attach(model, method, data=batches)")
        return self._start(module_name, weight, init, None)

    def _start(self, module_name: str, weight: torch.Tensor, init: Initializer, stats) -> LowRankDelta:
        """The delta of one layer as ``init`` starts it (its rank checked when the start is a part of ``W``)."""
        r, s = self.scale_of(module_name)
        if init.kind == "residual" and r > min(weight.shape):
            raise ValueError(f"{module_name}: rank {r} exceeds min(out, in) = {min(weight.shape)} "
                             f"for init={self.init!r}")
        return self._delta(weight, r, s, init.kind, init.start(weight, r, s, self, stats))

    def _delta(self, weight: torch.Tensor, r: int, s: float, kind: str, value) -> LowRankDelta:
        """A LoRA of rank ``r`` started as an :class:`Initializer` of ``kind`` says: anchored on ``value = (B0, A0)``,
        ``A = value`` with ``B = 0``, or ``value(A)`` filling the random ``A``."""
        out_f, in_f = weight.shape
        delta = LowRankDelta(out_f, in_f, r, s, self.dropout, dtype=adapter_dtype(weight), device=weight.device,
                             anchored=kind == "residual")
        with torch.no_grad():
            if kind == "residual":
                B0, A0 = value
                for dst, src in ((delta.A, A0), (delta.A0, A0), (delta.B, B0), (delta.B0, B0)):
                    dst.copy_(src)
            elif kind == "A":
                delta.A.copy_(value)
            else:
                value(delta.A)
        return delta

    def build_all(self, model: nn.Module, layers: dict, data=None) -> dict:
        init = initializer(self.init)
        if init.build_all is not None:
            return init.build_all(self, model, layers, data)
        if not init.needs_data:
            return super().build_all(model, layers, data)
        cal = self.calibration_for(model, list(layers), data, init)
        out = {}
        for n, (w, _) in layers.items():
            missing = [k for k in init.stats if n not in cal or k not in cal[n].sums]
            if missing:
                raise ValueError(f"the calibration has no {_STAT_NAMES.get(missing[0], missing[0])} statistic for {n!r}")
            out[n] = self._start(n, w, init, cal[n])
        return out

    def calibration_for(self, model: nn.Module, names: list[str], data, init: Initializer):
        """The statistics ``init`` needs for layers ``names``: computed from ``data`` batches, or read from the
        method's ``calibration`` file (a ``dt.calibrate(..., cache=FILE)``) without data."""
        cached = init.option(self, "calibration") if "calibration" in init.options else None
        if data is None and cached is None:
            raise ValueError(f"init={self.init!r} needs calibration data: dt.attach(model, method, data=batches) "
                             f"or calibration='file' from dt.calibrate(..., stats={init.stats!r}, cache='file')")
        if data is None:
            return load_calibration(cached)
        return calibrate(model, data, targets=names, stats=init.stats, max_batches=init.option(self, "max_batches"))

    # -- PEFT LoRA checkpoints -------------------------------------------------------------------------------
    peft_type = "LORA"
    peft_structure = "lowrank"
    peft_keys = LORA_KEYS

    def peft_lora(self) -> dict:
        return {"lora_dropout": float(self.dropout), "use_rslora": bool(self.use_rslora)}

    @classmethod
    def peft_rank(cls, config: dict, mod: str, source: str) -> int:
        """The rank PEFT gives module ``mod``: ``rank_pattern`` (PEFT's key rule, run bounded) or ``r``."""
        return int(pattern_value(mod, config.get("rank_pattern"), config["r"], f"{source}: rank_pattern key"))

    @classmethod
    def peft_scale(cls, config: dict, mod: str, r: int, source: str) -> float:
        """``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), ``lora_alpha`` per ``alpha_pattern``."""
        alpha = pattern_value(mod, config.get("alpha_pattern"), config["lora_alpha"], f"{source}: alpha_pattern key")
        return lora_scale(alpha, r, bool(config.get("use_rslora", False)))

    @classmethod
    def from_peft_config(cls, config: dict, targets: list[str], saved: list[str]) -> dict:
        """This method's config (as :meth:`to_dict` would give it) for a PEFT LoRA ``config``."""
        return {"method": cls.name, "r": int(config["r"]), "alpha": config["lora_alpha"],
                "dropout": config.get("lora_dropout", 0.0), "use_rslora": bool(config.get("use_rslora", False)),
                "targets": targets, "modules_to_save": saved or None,
                "rank_pattern": config.get("rank_pattern") or None, "alpha_pattern": config.get("alpha_pattern") or None}


_STAT_NAMES = {"corda": "CorDA"}


def eva_components(model: nn.Module, data, wanted: dict[str, int], budget: int, tau: float = 0.99,
                   max_batches=None, max_epochs: int = 4) -> dict:
    """``{layer: (components (k x in), explained-variance ratios (k,))}``: the PCA of each layer's inputs, refined
    batch by batch until, for every layer, the components it would receive from the ``budget`` now
    (:func:`deltatune.methods.datainit.allocate_ranks`) are stable (``|cos| >= tau`` with the previous batch's),
    cycling over ``data`` at most ``max_epochs`` times. Layers that see one input share one PCA."""
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


def eva_build_all(method: LoRA, model: nn.Module, layers: dict, data=None) -> dict:
    """EVA's deltas: ``A`` = the first of each layer's input principal directions (:func:`eva_components`), ``B = 0``,
    at the ranks the global budget ``sum r`` gives each layer (0: no adapter there); the scale stays ``alpha / r``."""
    if data is None:
        raise ValueError("init='eva' needs calibration data: dt.attach(model, method, data=batches)")
    init = initializer("eva")
    names = list(layers)
    rho = init.option(method, "eva_rho")
    wanted = {n: min(round(rho * method.rank_alpha(n)[0]), min(layers[n][0].shape)) for n in names}
    budget = sum(method.rank_alpha(n)[0] for n in names)
    comps = eva_components(model, data, wanted, budget, init.option(method, "eva_tau"),
                           init.option(method, "max_batches"))
    ranks = allocate_ranks({n: ratios for n, (_, ratios) in comps.items()}, budget)
    out = {}
    for n, (w, _) in layers.items():
        if ranks[n] == 0:
            continue  # EVA gives this layer no rank: no adapter there
        _, s = method.scale_of(n)  # alpha_layer = alpha k / r: the scale stays alpha / r
        out[n] = method._delta(w, ranks[n], s, "A", comps[n][0][: ranks[n]].to(w.dtype))
    return out


register_init(Initializer("eva", kind="A", stats=("cov", "mean"), options=EVA_OPTIONS, build_all=eva_build_all))
#: the registered ``init=`` names
INITS = tuple(_INITS)
DATA_INITS = tuple(n for n, i in _INITS.items() if i.needs_data)  # need calibration data at attach


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
    task data; ``"corda_kpa"``: bottom components, from data whose knowledge is to be kept). ``calibration``: a
    ``dt.calibrate(..., stats=("corda",), cache=FILE)`` file instead of ``data=`` at attach; ``max_batches``:
    calibration batches to use."""

    name = "corda"
    init: str = "corda_ipa"
    calibration: str | None = None
    max_batches: int | None = None


@dataclass
class EVA(LoRA):
    """LoRA with ``A`` = the top principal directions of each layer's inputs, ranks redistributed by explained
    variance (``eva_rho``, ``eva_tau``), ``B = 0``; ``max_batches``: calibration batches to use."""

    name = "eva"
    init: str = "eva"
    eva_rho: float = 2.0
    eva_tau: float = 0.99
    max_batches: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.eva_rho < 1 or not 0 < self.eva_tau <= 1:
            raise ValueError(f"EVA needs eva_rho >= 1 and eva_tau in (0, 1], got {self.eva_rho}, {self.eva_tau}")


@dataclass
class OLoRA(LoRA):
    """LoRA initialized from the QR decomposition of the weight."""

    name = "olora"
    init: str = "olora"
