"""Low-rank compression of a pretrained model: chosen linear layers ``y = W x + b`` become two linears,
``y = U_k (S_k V_k^T x) + b`` (``k (in + out)`` parameters instead of ``in x out``).

Three ways to choose the rank-``k`` factors, each the optimum of its own error:

- ``"svd"``: ``W = U S V^T``, keep the top ``k`` triplets; minimizes ``||W - W_k||_F``.
- ``"activation"`` (activation-aware, SVD-LLM-style whitening): with the input second moment ``C = E[x x^T] = L L^T``
  (Cholesky, damped until positive definite), ``W L = U S V^T``, ``W_k = U_k S_k V_k^T L^{-1}``; minimizes
  ``E ||(W - W_k) x||^2 = ||(W - W_k) L||_F^2``: the error on the outputs the layer actually produces.
- ``"fisher"`` (Fisher-weighted SVD, FWSVD): with row importances ``I_r = sum of squared loss gradients of row r``,
  ``D = diag(sqrt(I))``, ``D W = U S V^T``, ``W_k = D^{-1} U_k S_k V_k^T``; minimizes ``||D (W - W_k)||_F``.

*Global rank allocation.* In each layer's own metric, triplet ``i`` removes ``s_i^2`` of the error and costs
``in + out`` parameters. Normalized per layer (``s_i^2 / sum_j s_j^2``, the share of the layer's energy), the triplets of
all layers are taken greedily by share per parameter until the parameter budget ``(1 - ratio) x (model parameters)``
is met; a layer whose rank reaches ``in out / (in + out)`` stays dense (factoring would not save anything). So layers
with a flat spectrum, or whose inputs spread over many directions, get more rank.

The compressed model keeps the ``transformers`` file layout (``save_pretrained`` writes ``config.json`` with the
ranks under ``deltatune_compression`` and the weights; :func:`load_compressed` rebuilds it), and any deltatune
adapter attaches to its factor linears afterwards.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from safetensors.torch import load_file
from torch import nn

from . import model as M
from .layers import is_linear, kind_of, linear_weight, set_submodule
from .io.weights import weight_files
from .calibration import Calibration, calibrate
from .util import progress, run_batch
from .targets import resolve_targets

METHODS = ("svd", "activation", "fisher")
CONFIG_KEY = "deltatune_compression"


# -- pure tensor math ---------------------------------------------------------------------------------------------------
def damped_cholesky(C: torch.Tensor, damping: float = 1e-6) -> torch.Tensor:
    """``L`` with ``L L^T = C + d mean(diag C) I``, ``d`` from ``damping`` upwards (x10) until ``C`` factors."""
    C = C.double()
    if not torch.isfinite(C).all():
        raise ValueError("the input covariance has NaN or inf entries (half-precision overflow, or a layer that saw "
                         "no tokens); calibrate in float32 with real data")
    eye = torch.eye(C.shape[0], dtype=C.dtype)
    scale = float(C.diagonal().mean()) or 1.0
    d = damping
    for _ in range(20):
        L, info = torch.linalg.cholesky_ex(C + d * scale * eye)
        if int(info) == 0:
            return L
        d *= 10
    raise ValueError("the input covariance could not be made positive definite")


def weighted_svd(W: torch.Tensor, left: torch.Tensor | None = None, right: torch.Tensor | None = None):
    """``(U, S, Vh)`` of ``left W right`` (``left`` a vector of row weights, ``right`` a matrix), float64."""
    M_ = W.detach().double()
    if left is not None:
        M_ = left.double().unsqueeze(1) * M_
    if right is not None:
        M_ = M_ @ right.double()
    return torch.linalg.svd(M_, full_matrices=False)


def factors_from(U, S, Vh, k: int, left: torch.Tensor | None = None, right: torch.Tensor | None = None):
    """``(up, down)`` with ``up @ down = left^{-1} U_k S_k Vh_k right^{-1}``: the rank-``k`` weight in the original
    coordinates (``up`` out x k, ``down`` k x in; the singular values split evenly, ``sqrt(S)`` on each side;
    ``right`` lower triangular, a Cholesky factor)."""
    root = S[:k].sqrt()
    up, down = U[:, :k] * root, root.unsqueeze(1) * Vh[:k]
    if left is not None:
        up = up / left.double().unsqueeze(1)
    if right is not None:  # down L^{-1}, by a triangular solve with L^T
        down = torch.linalg.solve_triangular(right.double().t(), down.t(), upper=True).t()
    return up, down


def allocate(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], budget: int) -> dict[str, int]:
    """``{layer: rank}`` (``-1``: stays dense) keeping at most ``budget`` parameters in these layers, by greedily
    taking the triplets with the largest share of their layer's energy per parameter (module docstring); every layer
    keeps at least one triplet."""
    cands = []
    for name, S in spectra.items():
        out_f, in_f = shapes[name]
        share = (S.double() ** 2) / max(float((S.double() ** 2).sum()), 1e-300)
        cands += [(float(share[i]) / (in_f + out_f), name, i) for i in range(S.numel())]
    cands.sort(key=lambda c: -c[0])
    ranks = {name: 1 for name in spectra}  # every layer keeps at least its top triplet (rank 0 would delete it)
    used = sum(in_f + out_f for out_f, in_f in (shapes[n] for n in spectra))
    if used > budget:
        raise ValueError(f"even rank 1 everywhere needs {used:,} parameters, more than the budget {budget:,}; lower "
                         "the ratio or target more layers")
    for _, name, i in cands:
        if i == 0:
            continue
        out_f, in_f = shapes[name]
        if ranks[name] < 0:
            continue
        full = ranks[name] + 1 >= math.floor(out_f * in_f / (in_f + out_f))
        new_cost = out_f * in_f if full else (ranks[name] + 1) * (in_f + out_f)
        old_cost = ranks[name] * (in_f + out_f)
        if used - old_cost + new_cost > budget:
            continue
        used += new_cost - old_cost
        ranks[name] = -1 if full else ranks[name] + 1
    return ranks


# -- the module -----------------------------------------------------------------------------------------------------------
class LowRankLinear(nn.Module):
    """``y = up(down(x))``: ``down`` (in -> k, no bias) then ``up`` (k -> out, the original bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def weight(self) -> torch.Tensor:
        """The rank-``k`` weight ``up @ down`` (out x in), for code that reads ``.weight``."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


# -- statistics the methods need ---------------------------------------------------------------------------------------
def fisher_rows(model: nn.Module, data: Iterable, names: list[str], max_batches: int | None = None):
    """``{layer: I}`` with ``I_r = sum over batches of sum_j (dL/dW_rj)^2`` (each batch a dict with ``labels``)."""
    modules = dict(model.named_modules())
    weights = {n: modules[n].weight for n in names}  # the parameters themselves (a Conv1D's linear view is not one)
    flags = {n: w.requires_grad for n, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
    rows = {n: torch.zeros(linear_weight(modules[n]).shape[0], dtype=torch.float64) for n in names}
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(progress(data, "fisher")):
            if max_batches is not None and i >= max_batches:
                break
            model.zero_grad(set_to_none=True)
            out = run_batch(model, batch)
            loss = out.loss if hasattr(out, "loss") else out
            if loss is None:
                raise ValueError("Fisher-weighted compression needs a loss: give batches with labels")
            loss.backward()
            for n, w in weights.items():
                g = modules[n].weight.grad
                g = kind_of(modules[n]).to_linear(g)
                rows[n] += g.double().pow(2).sum(1)
    finally:
        model.zero_grad(set_to_none=True)
        for n, w in weights.items():
            w.requires_grad_(flags[n])
        model.train(was_training)
    return rows


# -- the verb --------------------------------------------------------------------------------------------------------------
def compress(model: nn.Module, ratio: float, method: str = "activation", data: Iterable | None = None,
             calibration: Calibration | None = None, targets="all-linear", exclude=None,
             max_batches: int | None = None) -> dict[str, int]:
    """Replace linear layers of ``model`` (in place) by rank-``k`` factorizations so that the model has ``ratio``
    fewer parameters; returns ``{layer: rank}`` (``-1``: left dense).

    ``method``: ``"svd"``, ``"activation"`` (needs ``calibration`` from :func:`deltatune.calibrate` with ``"cov"``,
    or ``data`` to compute it) or ``"fisher"`` (needs ``data``: batches with labels). The ranks are recorded in
    ``model.config.deltatune_compression`` so that ``save_pretrained`` / :func:`load_compressed` round-trip.
    """
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; choose one of {METHODS}")
    if not 0 < ratio < 1:
        raise ValueError(f"ratio is the fraction of parameters to remove, in (0, 1); got {ratio}")
    if M.adapters(model):
        raise ValueError("compress the base model before attaching adapters (dt.unload(model) first)")
    names = resolve_targets(model, targets, exclude, accept=is_linear)
    modules = dict(model.named_modules())
    total = sum(p.numel() for p in model.parameters())
    shapes = {n: tuple(linear_weight(modules[n]).shape) for n in names}
    target_params = sum(o * i for o, i in shapes.values())
    budget = target_params - math.ceil(ratio * total)
    if budget <= 0:
        raise ValueError(f"removing {ratio:.0%} of {total:,} parameters needs more than the {target_params:,} in the "
                         "targeted layers; lower the ratio or target more layers")
    left, right = {}, {}
    if method == "activation":
        if calibration is None:
            if data is None:
                raise ValueError("activation-aware compression needs calibration data: data=batches or "
                                 "calibration=dt.calibrate(model, batches)")
            calibration = calibrate(model, data, targets=names, stats=("cov",), max_batches=max_batches)
        missing = [n for n in names if n not in calibration or "cov" not in calibration[n].sums]
        if missing:
            raise ValueError(f"the calibration has no input covariance for {missing[:3]}; calibrate with "
                             "stats=('cov',) on the same targets")
        chol = {}
        for n in names:
            key = id(calibration[n])
            if key not in chol:
                chol[key] = damped_cholesky(calibration[n].cov_matrix())
            right[n] = chol[key]
    elif method == "fisher":
        if data is None:
            raise ValueError("Fisher-weighted compression needs data: batches with labels")
        for n, I in fisher_rows(model, data, names, max_batches).items():
            left[n] = (I / I.mean().clamp_min(1e-300)).sqrt().clamp_min(1e-6)
    svds = {}
    for n in progress(names, "svd"):
        svds[n] = weighted_svd(linear_weight(modules[n]), left.get(n), right.get(n))
    ranks = allocate({n: s[1] for n, s in svds.items()}, shapes, budget)
    for n in names:
        k = ranks[n]
        if k < 0:
            continue
        base = modules[n]
        W = linear_weight(base)
        up, down = factors_from(*svds[n], k, left.get(n), right.get(n))
        new = LowRankLinear(W.shape[1], W.shape[0], k, base.bias is not None, W.dtype, W.device)
        with torch.no_grad():
            new.up.weight.copy_(up)
            new.down.weight.copy_(down)
            if base.bias is not None:
                new.up.bias.copy_(base.bias)
        for p in new.parameters():
            p.requires_grad_(W.requires_grad)
        set_submodule(model, n, new)
    record = {n: k for n, k in ranks.items() if k >= 0}
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, {"method": method, "ratio": ratio, "ranks": record})
    return ranks


def compressed_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def apply_ranks(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Replace the layers named in ``ranks`` by empty :class:`LowRankLinear` modules of those ranks (to load into)."""
    modules = dict(model.named_modules())
    for n, k in ranks.items():
        base = modules[n]
        W = linear_weight(base)
        set_submodule(model, n, LowRankLinear(W.shape[1], W.shape[0], k, base.bias is not None, W.dtype, W.device))
    return model


def load_compressed(path, model_class=None, **kwargs) -> nn.Module:
    """A model saved (``save_pretrained``) after :func:`compress`: built from its config, its compressed layers
    replaced by factor pairs of the recorded ranks, then its weights loaded."""
    import transformers  # optional third-party dependency (the hf extra)

    config = transformers.AutoConfig.from_pretrained(path)
    info = getattr(config, CONFIG_KEY, None)
    if not info:
        raise ValueError(f"{path}/config.json has no {CONFIG_KEY!r}: not a model compressed by deltatune")
    cls = model_class or getattr(transformers, (config.architectures or [""])[0], None)
    if cls is None:
        raise ValueError(f"cannot tell the model class of {path}; pass model_class=")
    model = cls(config, **kwargs)
    apply_ranks(model, info["ranks"])
    state = {}
    for f in weight_files(path):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not any(k.startswith(t) for t in tied)]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the compressed model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


from ._modules import callable_module  # noqa: E402

callable_module(__name__, "deltatune.compress:compress")  # dt.compress(...) calls the function
