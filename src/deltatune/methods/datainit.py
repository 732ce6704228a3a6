"""Data-aware LoRA initializations: CorDA and EVA (pure tensor functions; the calibration pass is
:func:`deltatune.calibrate`).

**CorDA** (Yang et al., NeurIPS 2024). From the CorDA statistic ``C`` of a layer's inputs (every sample scaled by
its signed maximum, :class:`deltatune.calibration.LayerStats`), damped ``C_f = C + d mean(diag C) I`` (``d`` from
0.01, doubled until ``||C_f C_f^{-1} - I|| < 0.05``), the context-oriented decomposition is
``W C_f = U S Vh``, ``V^T = Vh C_f^{-1}``, so that ``W = U S V^T`` exactly (``V`` not orthonormal). IPA
(instruction-previewed, task data) takes the top ``r`` components, KPA (knowledge-preserved, QA data) the bottom
``r``; ``B0 = U diag(sqrt(S/s))``, ``A0 = diag(sqrt(S/s)) V^T``, trained as a residual like PiSSA (saved as a plain
LoRA of rank ``2r`` on the unmodified base).

**EVA** (Paischer et al., explained variance adaptation). ``A`` = the top principal directions of the layer's
(mean-centred) inputs, ``B = 0``. The PCA is refined batch by batch; a layer has converged when each of its
components has cosine similarity ``>= tau`` with the previous batch's. Every layer offers ``round(rho r)``
components; the global budget ``sum r`` goes to the components with the largest explained-variance ratios across all
layers, so a layer gets between 0 (no adapter) and ``rho r``, and the scale stays ``alpha / r`` (PEFT's
``adjust_scaling_factors``).
"""
from __future__ import annotations

import torch


def corda_damped(C: torch.Tensor, start: float = 0.01, tol: float = 0.05):
    """``(C_f, C_f^{-1})`` with the smallest damping ``d = start * 2^k`` that makes ``C_f`` safely invertible."""
    C = C.double()
    if not torch.isfinite(C).all():
        raise ValueError("the CorDA covariance has NaN or inf entries; calibrate in float32 with real data")
    eye = torch.eye(C.shape[0], dtype=C.dtype)
    scale = float(C.diagonal().mean()) or 1.0
    d = start
    for _ in range(60):
        C_f = C + d * scale * eye
        inv = torch.linalg.inv(C_f)
        if float((C_f @ inv - eye).norm()) < tol:
            return C_f, inv
        d *= 2
    raise ValueError("the CorDA covariance could not be damped into an invertible matrix")


def corda_decompose(W: torch.Tensor, C: torch.Tensor):
    """``(U, S, Vt)`` with ``W = U diag(S) Vt`` exactly, from the SVD of ``W C_f`` (``Vt = Vh C_f^{-1}``)."""
    C_f, inv = corda_damped(C)
    U, S, Vh = torch.linalg.svd(W.detach().double() @ C_f, full_matrices=False)
    return U, S, Vh @ inv


def corda_factors(W: torch.Tensor, C: torch.Tensor, r: int, s: float, mode: str = "ipa"):
    """``(B0, A0)`` with ``s B0 A0`` = the top (``"ipa"``) or bottom (``"kpa"``) ``r`` CorDA components of ``W``."""
    U, S, Vt = corda_decompose(W, C)
    sl = slice(0, r) if mode == "ipa" else slice(S.shape[0] - r, S.shape[0])
    root = torch.sqrt(S[sl] / s)
    return (U[:, sl] * root).float(), (root[:, None] * Vt[sl]).float()


def pca(second: torch.Tensor, mean: torch.Tensor, k: int):
    """``(components (k x in), explained-variance ratios (k,))`` of inputs with second moment ``E[x x^T]`` and mean."""
    cov = second.double() - torch.outer(mean.double(), mean.double())
    vals, vecs = torch.linalg.eigh(cov)
    vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
    total = float(vals.sum()) or 1.0
    return vecs[:, :k].t().contiguous(), vals[:k] / total


def converged(prev: torch.Tensor | None, now: torch.Tensor, tau: float) -> bool:
    """Whether every component (row) of ``now`` has ``|cos| >= tau`` with the same row of ``prev``."""
    if prev is None:
        return False
    cos = (prev * now).sum(1).abs() / (prev.norm(dim=1) * now.norm(dim=1)).clamp_min(1e-300)
    return bool((cos >= tau).all())


def allocate_ranks(ratios: dict[str, torch.Tensor], budget: int) -> dict[str, int]:
    """Per layer, how many of its components are among the ``budget`` largest explained-variance ratios overall
    (components of one layer are taken in order)."""
    pool = sorted(((float(v), name, i) for name, r in ratios.items() for i, v in enumerate(r)), key=lambda t: -t[0])
    ranks = {name: 0 for name in ratios}
    for _, name, _ in pool[:budget]:
        ranks[name] += 1
    return ranks
