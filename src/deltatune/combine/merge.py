"""``dt.combine``: a new adapter from several adapters of any structures.

Per layer, with ``dW_i`` the adapters' updates (zero where an adapter has no delta) and ``w_i`` their weights:

- ``method="sum"`` (task arithmetic) ``sum_i w_i dW_i``, kept in the most compact exact structure
  (:func:`exact_sum`): sparse deltas sum on the union of their entries, row (or column) blocks on the union of
  their rows; when every delta on the layer is a low-rank product it is computed *on the factors* as one LoRA of
  the summed ranks, ``B = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...]``, ``A = [A_1; A_2; ...]`` (different ranks and rank
  patterns are fine; PEFT's weighted merge weights ``A`` and ``B`` separately, which is not the weighted sum);
  anything else (a LoRA plus a sparse delta plus a rotation) sums as one dense delta;
- ``"ties"``, ``"dare"``, ``"dare_ties"``, ``"magnitude"`` (magnitude-pruned sum) on the dense updates
  (:mod:`deltatune.combine.ops`).

The result is exact (a low-rank delta, or a dense one where nothing more compact represents it) unless ``rank``
or ``energy`` asks for a LoRA: then every layer is re-factorized by truncated SVD, to ``rank`` components or to
the fewest that hold ``energy`` of ``||dW||_F^2``, and the relative Frobenius error per layer is returned.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..deltas import DenseDelta, Delta, LowRankDelta
from ..methods import Method
from ..util import progress as progress_bar
from ..checks import export_rank_energy
from ..svd import factored_svd, keep_count, svd_factors, tail_error
from .. import model as M
from ..layers import kind_named, linear_weight, unwrap
from ..registry import check_names, check_new_name
from ..io.peft_format import bound_delta
from ..io.record import AdapterRecord
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


def exact_sum(terms: list[tuple[Delta, float]]) -> Delta | None:
    """``sum_i w_i dW_i`` in the most compact structure that holds it exactly: the deltas' own structure when they
    share one that can (:meth:`Delta.weighted_sum`: sparse on the union of entries, row or column blocks on the
    union of rows or columns), else one LoRA of the summed ranks when every delta is a low-rank product; ``None``
    when only a dense matrix holds it."""
    kinds = {type(d) for d, _ in terms}
    if len(kinds) == 1:
        summed = kinds.pop().weighted_sum(terms)
        if summed is not None:
            return summed
    factors = [d.lowrank() for d, _ in terms]
    if any(f is None for f in factors):
        return None
    return lowrank_delta(*concat_lowrank(factors, [w for _, w in terms]))


def lowrank_delta(B: torch.Tensor, A: torch.Tensor) -> LowRankDelta:
    """The LoRA ``dW = B A`` (scale 1)."""
    d = LowRankDelta(B.shape[0], A.shape[1], B.shape[1], 1.0)
    with torch.no_grad():
        d.B.copy_(B)
        d.A.copy_(A)
    return d


def dense_combination(terms: list[tuple[Delta, float]], method: str, density: float | None,
                      generator: torch.Generator | None) -> torch.Tensor:
    """The combined dense update of one layer for ``method`` (:mod:`deltatune.combine.ops`)."""
    taus = [d.dense().detach().float() for d, _ in terms]
    ws = [w for _, w in terms]
    if method == "sum":
        return ops.task_arithmetic(taus, ws)
    if method == "magnitude":
        return ops.task_arithmetic([ops.magnitude_prune(t, density) for t in taus], ws)
    if method == "ties":
        return ops.ties(taus, ws, density)
    return ops.dare(taus, ws, density, "ties" if method == "dare_ties" else "linear", generator)


def refactorize(delta: Delta, rank: int | None, energy: float | None) -> tuple[LowRankDelta, float]:
    """A LoRA of ``rank`` components (or the fewest holding ``energy`` of ``||dW||_F^2``) closest to ``delta``, and
    its relative Frobenius error; on the factors when ``delta`` is low-rank, else by SVD of ``dW``."""
    factors = delta.lowrank()
    if factors is not None:
        B, A, s = factors
        B, A, err = truncate(B.detach().float() * s, A.detach().float(), rank, energy)
    else:
        B, A, err = svd_factors(delta.dense(), rank, energy)
    return lowrank_delta(B, A), err


def combine_layer(deltas: list[Delta | None], weights: list[float], method: str, density: float | None,
                  generator: torch.Generator | None, rank: int | None, energy: float | None):
    """The combined delta of one layer and its re-factorization error (0 when exact)."""
    terms = [(d, w) for d, w in zip(deltas, weights) if d is not None]
    delta = exact_sum(terms) if method == "sum" else None
    if delta is None:
        delta = DenseDelta(dense_combination(terms, method, density, generator))
    if rank is None and energy is None or delta.whole_module:  # a module kept whole stays whole
        return delta, 0.0
    return refactorize(delta, rank, energy)


def check_options(method: str, n: int, weights, density, rank, energy):
    """Validated ``(weights, density)`` for combining ``n`` adapters; raises ``ValueError`` naming what to fix."""
    if method not in METHODS:
        raise ValueError(f"unknown combine method {method!r}; choose one of {METHODS}")
    if n == 0:
        raise ValueError("give at least one adapter to combine")
    weights = ops._weights(n, weights)
    export_rank_energy(rank, energy)
    if method != "sum":
        density = density if density is not None else (0.2 if method in ("ties", "magnitude") else 0.5)
        ops._check_density(density)
    return weights, density


def combine_deltas(per_adapter: list[Mapping[str, Delta]], method: str = "sum", weights=None,
                   density: float | None = None, rank: int | None = None, energy: float | None = None,
                   seed: int = 0) -> tuple[dict[str, Delta], dict[str, float], list, float]:
    """Combine adapters given as ``{module: delta}`` maps, without a model (a progress bar on a terminal): ``(deltas, errors, weights, density)``.
    Deltas whose update depends on the base weight (rotations) must be bound to it (:meth:`Delta.bind`)."""
    weights, density = check_options(method, len(per_adapter), weights, density, rank, energy)
    modules = list(dict.fromkeys(m for d in per_adapter for m in d))
    generator = torch.Generator().manual_seed(seed)
    built, errors = {}, {}
    for mod in progress_bar(modules, "combine"):
        layer = [d.get(mod) for d in per_adapter]  # built here, one module at a time, when the maps are lazy
        shapes = {(d.out_features, d.in_features) for d in layer if d is not None}
        if len(shapes) > 1:
            raise ValueError(f"the adapters disagree on the shape of {mod!r} ({sorted(shapes)}): they were trained on "
                             "different base models and cannot be combined")
        built[mod], errors[mod] = combine_layer(layer, weights, method, density, generator, rank, energy)
    return built, errors, weights, density


def combine(model, names: list[str], method: str = "sum", weights=None, density: float | None = None,
            rank: int | None = None, energy: float | None = None, name: str = "combined", seed: int = 0,
            activate: bool = True) -> dict[str, float]:
    """Add adapter ``name`` to ``model``: the combination of adapters ``names`` (see the module docstring).

    ``weights``: one per adapter (default 1); ``density``: the kept fraction for TIES / DARE / magnitude (TIES
    0.2, DARE 0.5 by default); ``rank`` / ``energy``: re-factorize to a LoRA. ``seed`` fixes DARE's drops. Returns
    ``{module: relative Frobenius error}`` of the re-factorization (all 0 when exact). The inputs stay as they were.
    """
    names = check_names(model, names)
    check_options(method, len(names), weights, density, rank, energy)
    check_new_name(model, name)
    model = unwrap(model)
    built, errors, weights, density = combine_deltas([M.deltas(model, n) for n in names], method, weights, density,
                                                     rank, energy, seed)
    for mod, delta in built.items():
        built[mod] = delta.to(device=linear_weight(model.get_submodule(mod).base).device)
    config = Combined(targets=list(built), sources=names, how=method, weights=weights, density=density, rank=rank,
                      energy=energy, seed=seed)
    M.install(model, name, config, built, activate)
    return errors


class RecordDeltas(Mapping):
    """``{module: delta}`` of a saved adapter, each delta built (and bound to its base weight, when it needs one)
    only when asked for, so combining saved adapters holds one module's base weights at a time."""

    def __init__(self, record, base=None):
        self.record, self.base = record, base

    def __getitem__(self, mod: str) -> Delta:
        return bound_delta(mod, self.record.modules[mod], self.record.tensors[mod], self.base)

    def get(self, mod: str, default=None):  # not Mapping.get: a KeyError from building a delta must surface
        return self[mod] if mod in self.record.modules else default

    def __iter__(self):
        return iter(self.record.modules)

    def __len__(self) -> int:
        return len(self.record.modules)


def layer_entries(spec: dict) -> dict:
    """The layer part of a saved module spec: its kind and the geometry file formats need (a conv's kernel)."""
    kind = spec.get("layer")
    keys = kind_named(kind).geometry_keys if kind else ()
    return {"layer": kind, **{k: spec[k] for k in keys if k in spec}}


def combine_records(records: list, method: str = "sum", weights=None, density: float | None = None,
                    rank: int | None = None, energy: float | None = None, seed: int = 0, name: str = "combined",
                    base=None):
    """Combine saved adapters (:class:`deltatune.io.AdapterRecord`, e.g. from :func:`deltatune.io.read_record`)
    without a model: ``(record of the combination, {module: relative error})``. ``base(module, spec) -> (weight,
    bias)`` supplies the base weight that rotation deltas and kept-whole modules need (e.g. from
    :class:`deltatune.io.weights.WeightStore`)."""
    if not records:
        raise ValueError("give at least one adapter to combine")
    per_adapter = [RecordDeltas(rec, base) for rec in records]
    built, errors, weights, density = combine_deltas(per_adapter, method, weights, density, rank, energy, seed)
    layer = {mod: layer_entries(spec) for rec in reversed(records) for mod, spec in rec.modules.items()}
    config = Combined(targets=list(built), sources=[r.name for r in records], how=method, weights=weights,
                      density=density, rank=rank, energy=energy, seed=seed)
    record = AdapterRecord(name, config.to_dict(), {m: {**layer[m], **d.spec()} for m, d in built.items()},
                           {m: d.tensors() for m, d in built.items()}, base_model=records[0].base_model,
                           task_type=records[0].task_type)
    return record, errors
