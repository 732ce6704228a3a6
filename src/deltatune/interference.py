"""How much would two adapters interfere if they were summed into one model?

For two deltas ``dW_a, dW_b`` on one layer (any structures), with orthonormal bases ``V`` of their row spaces (the
input directions they read) and ``U`` of their column spaces (the output directions they write)::

    input overlap  = ||V_a^T V_b||_F^2 / min(k_a, k_b)      in [0, 1]
    output overlap = ||U_a^T U_b||_F^2 / min(k_a, k_b)

0 means orthogonal subspaces (e.g. Orthogonal Adaptation on disjoint slots has input overlap 0), 1 that one
subspace contains the other; two random subspaces of dimensions ``k_a, k_b`` in ``R^n`` give about
``max(k_a, k_b) / n``. ``k`` is the number of singular values needed to hold ``energy`` (99 %) of ``||dW||_F^2``.

Given calibration inputs for adapter ``a`` (the layer inputs ``x_a`` seen while ``a`` alone is active), the
measured cross-talk of ``b`` on ``a`` is ``||dW_b x_a|| / ||dW_a x_a||`` (norms summed over all tokens): how large
the foreign update is, relative to ``a``'s own, on exactly the activations ``a`` was trained for. The paper's
argument (Po et al., 2024) is that this is small when ``dW_b``'s input subspace is orthogonal to ``dW_a``'s.
"""
from __future__ import annotations

from collections.abc import Iterable
from itertools import combinations

import torch
from torch import nn

from .model import deltas, override_active
from .layers import unwrap
from .registry import BEFORE_SWITCH, adapted_layers, check_names, notify
from .util import progress, run_batch
from .deltas import Delta
from .svd import energy_rank, factored_svd


# -- pure tensor math ------------------------------------------------------------------------------------------
def subspaces(delta: Delta, energy: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)``: orthonormal bases (out x k and in x k) of the column and row spaces of ``dW``, truncated to hold
    ``energy`` of its squared Frobenius norm. Factored deltas are decomposed through their factors (two thin QRs
    and an r x r SVD); others through ``dense()``."""
    lr = delta.lowrank()
    if lr is not None:
        B, A, s = lr
        U, S, V = factored_svd(B * s, A)
    else:
        U, S, Vh = torch.linalg.svd(delta.dense().detach().float(), full_matrices=False)
        V = Vh.t()
    k = energy_rank(S, energy)
    return U[:, :k], V[:, :k]


def overlap(X: torch.Tensor, Y: torch.Tensor) -> float:
    """``||X^T Y||_F^2 / min(k_x, k_y)`` for orthonormal columns ``X``, ``Y`` (0 when either is empty)."""
    k = min(X.shape[1], Y.shape[1])
    return float((X.t() @ Y).pow(2).sum() / k) if k else 0.0


def pair_overlaps(deltas: dict[str, dict[str, Delta]], energy: float = 0.99) -> list[dict]:
    """Per layer and adapter pair, the input and output overlaps. ``deltas``: ``{adapter: {module: delta}}``; a layer
    counts for a pair when both adapters have a delta on it."""
    names = list(deltas)
    modules = [m for m in dict.fromkeys(m for n in names for m in deltas[n])]
    rows = []
    for mod in modules:
        spaces = {n: subspaces(deltas[n][mod], energy) for n in names if mod in deltas[n]}
        for a, b in combinations([n for n in names if n in spaces], 2):
            (Ua, Va), (Ub, Vb) = spaces[a], spaces[b]
            rows.append({"module": mod, "a": a, "b": b, "rank_a": Va.shape[1], "rank_b": Vb.shape[1],
                         "input_overlap": overlap(Va, Vb), "output_overlap": overlap(Ua, Ub)})
    return rows


# -- measured cross-talk ---------------------------------------------------------------------------------------
@torch.no_grad()
def crosstalk(model: nn.Module, names: list[str], inputs: dict[str, Iterable]) -> dict[tuple[str, str, str], float]:
    """``{(module, a, b): ||dW_b x_a|| / ||dW_a x_a||}`` with ``x_a`` the layer inputs while ``a`` alone is active
    on ``inputs[a]``. The model's active adapters, train/eval mode and gradient flags are restored afterwards."""
    notify(BEFORE_SWITCH, unwrap(model))  # e.g. serving takes out an adapter it merged for single-adapter batches
    layers = dict(adapted_layers(model))
    merged = sorted({n for layer in layers.values() for n in layer.merged})
    if merged:
        raise ValueError(f"adapters {merged} are merged into the weights; dt.unmerge(model) before measuring "
                         "cross-talk")
    was_training = model.training
    sums: dict[tuple[str, str, str], float] = {}
    try:
        model.eval()
        for a in names:
            if a not in inputs:
                continue
            handles = []
            for mod, layer in layers.items():
                if a not in layer.deltas:
                    continue
                present = [n for n in names if n in layer.deltas]

                def hook(_layer, args, mod=mod, present=present, layer=layer):
                    x = args[0]
                    for n in present:
                        d = layer.deltas[n]
                        y = layer.layer_kind.output(layer.base, d, x)
                        sums[(mod, a, n)] = sums.get((mod, a, n), 0.0) + float(y.float().pow(2).sum())
                handles.append(layer.register_forward_pre_hook(hook))
            try:
                with override_active(model, [a]):
                    for batch in progress(inputs[a], f"interference: inputs of {a}"):
                        run_batch(model, batch)
            finally:
                for h in handles:
                    h.remove()
    finally:
        model.train(was_training)
    out = {}
    for (mod, a, b), v in sums.items():
        if a != b and (mod, a, a) in sums:
            own = sums[(mod, a, a)]
            out[(mod, a, b)] = (v / own) ** 0.5 if own > 0 else float("inf")
    return out


def interference(model: nn.Module, names: list[str], inputs=None, energy: float = 0.99) -> list[dict]:
    """Per layer and adapter pair ``(a, b)``: ``input_overlap``, ``output_overlap`` and, with ``inputs``, the
    measured ``crosstalk_ab = ||dW_b x_a|| / ||dW_a x_a||`` and ``crosstalk_ba`` (see the module docstring).

    ``inputs``: calibration batches (dicts of model keyword arguments or tensors of input ids) used for every
    adapter, or ``{adapter: batches}`` to give each adapter its own task's inputs. The model is left as it was.
    """
    names = check_names(model, names)
    if len(names) < 2:
        raise ValueError(f"interference compares two or more adapters, got {names}")
    rows = pair_overlaps({n: deltas(model, n) for n in names}, energy)
    if inputs is not None:
        if not isinstance(inputs, dict):
            inputs = {n: list(inputs) if not isinstance(inputs, list) else inputs for n in names}
        talk = crosstalk(model, names, inputs)
        for row in rows:
            row["crosstalk_ab"] = talk.get((row["module"], row["a"], row["b"]))
            row["crosstalk_ba"] = talk.get((row["module"], row["b"], row["a"]))
    return rows


def summarize(rows: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """Mean of every numeric column per adapter pair."""
    out: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in rows:
        acc = out.setdefault((r["a"], r["b"]), {})
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                acc.setdefault(k, []).append(float(v))
    return {pair: {k: sum(v) / len(v) for k, v in cols.items()} for pair, cols in out.items()}


from ._modules import callable_module  # noqa: E402

callable_module(__name__, "deltatune.interference:interference")  # dt.interference(...) calls the function
