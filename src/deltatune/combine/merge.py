"""``dt.combine``: a new adapter from several adapters of any structures.

Per layer, with ``dW_i`` the adapters' updates (zero where an adapter has no delta) and ``w_i`` their weights:

- ``method="sum"`` (task arithmetic) ``sum_i w_i dW_i``; when every delta on the layer is a low-rank product it is
  computed *on the factors*, exactly, as one LoRA of the summed ranks: ``B = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...]``,
  ``A = [A_1; A_2; ...]`` (different ranks and rank patterns are fine; PEFT's weighted merge weights ``A`` and
  ``B`` separately, which is not the weighted sum);
- ``"ties"``, ``"dare"``, ``"dare_ties"``, ``"magnitude"`` (magnitude-pruned sum) on the dense updates
  (:mod:`deltatune.combine.ops`).

The result is exact (a low-rank delta, or a dense one where nothing more compact represents it) unless ``rank``
or ``energy`` asks for a LoRA: then every layer is re-factorized by truncated SVD, to ``rank`` components or to
the fewest that hold ``energy`` of ``||dW||_F^2``, and the relative Frobenius error per layer is returned.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..deltas import DenseDelta, Delta, LowRankDelta
from ..methods import Method
from ..svd import factored_svd, keep_count, svd_factors, tail_error
from . import ops

METHODS = ("sum", "ties", "dare", "dare_ties", "magnitude")


@dataclass
class Combined(Method):
    """The config recorded for an adapter made by :func:`combine` (it has no initializer and no controller)."""

    name = "combined"

    sources: list | None = None
    how: str = "sum"
    weights: list | None = None
    density: float | None = None
    rank: int | None = None
    energy: float | None = None
    seed: int = 0

    def build(self, module_name, weight, bias):
        raise ValueError("a combined adapter is made by dt.combine(model, names, ...), not attached")


def concat_lowrank(parts: list[tuple[torch.Tensor, torch.Tensor, float]], weights: list[float]):
    """``(B, A)`` with ``B A = sum_i w_i s_i B_i A_i`` (scale 1): factors side by side."""
    B = torch.cat([B_i.float() * (w * s) for (B_i, _, s), w in zip(parts, weights)], dim=1)
    A = torch.cat([A_i.float() for _, A_i, _ in parts], dim=0)
    return B, A


def truncate(B: torch.Tensor, A: torch.Tensor, rank: int | None, energy: float | None):
    """The best approximation of ``B A`` with ``rank`` components (or the fewest holding ``energy`` of its squared
    norm), ``(B', A', relative Frobenius error)``, computed on the factors (:func:`deltatune.svd.factored_svd`)."""
    U, S, V = factored_svd(B, A)
    k = keep_count(S, rank, energy)
    return U[:, :k] * S[:k], V[:, :k].t().contiguous(), tail_error(S, k)


def combine_layer(deltas: list[Delta | None], weights: list[float], method: str, density: float | None,
                  generator: torch.Generator | None, rank: int | None, energy: float | None):
    """The combined delta of one layer and its re-factorization error (0 when exact)."""
    present = [(d, w) for d, w in zip(deltas, weights) if d is not None]
    factors = [d.lowrank() for d, _ in present] if method == "sum" else [None]
    if all(f is not None for f in factors):
        B, A = concat_lowrank(factors, [w for _, w in present])
        err = 0.0
        if rank is not None or energy is not None:
            B, A, err = truncate(B, A, rank, energy)
    else:
        taus = [d.dense().detach().float() for d, _ in present]
        ws = [w for _, w in present]
        if method == "sum":
            dW = ops.task_arithmetic(taus, ws)
        elif method == "magnitude":
            dW = ops.task_arithmetic([ops.magnitude_prune(t, density) for t in taus], ws)
        elif method == "ties":
            dW = ops.ties(taus, ws, density)
        else:
            dW = ops.dare(taus, ws, density, "ties" if method == "dare_ties" else "linear", generator)
        if rank is None and energy is None:
            return DenseDelta(dW), 0.0
        B, A, err = svd_factors(dW, rank, energy)
    d = LowRankDelta(B.shape[0], A.shape[1], B.shape[1], 1.0)
    with torch.no_grad():
        d.B.copy_(B)
        d.A.copy_(A)
    return d, err


def combine(model, names: list[str], method: str = "sum", weights=None, density: float | None = None,
            rank: int | None = None, energy: float | None = None, name: str = "combined", seed: int = 0,
            activate: bool = True) -> dict[str, float]:
    """Add adapter ``name`` to ``model``: the combination of adapters ``names`` (see the module docstring).

    ``weights``: one per adapter (default 1); ``density``: the kept fraction for TIES / DARE / magnitude (TIES
    0.2, DARE 0.5 by default); ``rank`` / ``energy``: re-factorize to a LoRA. ``seed`` fixes DARE's drops. Returns
    ``{module: relative Frobenius error}`` of the re-factorization (all 0 when exact). The inputs stay as they were.
    """
    from .. import model as M

    if method not in METHODS:
        raise ValueError(f"unknown combine method {method!r}; choose one of {METHODS}")
    names = M._check_names(model, names)
    if not names:
        raise ValueError("give at least one adapter to combine")
    weights = ops._weights(len(names), weights)
    if rank is not None and rank <= 0 or energy is not None and not 0 < energy <= 1:
        raise ValueError(f"rank must be positive and energy in (0, 1], got rank={rank}, energy={energy}")
    if method != "sum":
        density = density if density is not None else (0.2 if method in ("ties", "magnitude") else 0.5)
        ops._check_density(density)
    M.check_new_name(model, name)
    model = M.unwrap(model)
    per_adapter = [M.deltas(model, n) for n in names]
    modules = list(dict.fromkeys(m for d in per_adapter for m in d))
    generator = torch.Generator().manual_seed(seed)
    built, errors = {}, {}
    for mod in modules:
        delta, err = combine_layer([d.get(mod) for d in per_adapter], weights, method, density, generator, rank,
                                   energy)
        w = M.linear_weight(model.get_submodule(mod).base)
        built[mod] = delta.to(device=w.device)
        errors[mod] = err
    config = Combined(targets=modules, sources=names, how=method, weights=weights, density=density, rank=rank,
                      energy=energy, seed=seed)
    M.install(model, name, config, built, activate)
    return errors
