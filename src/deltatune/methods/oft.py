"""OFT: orthogonal fine-tuning (Qiu et al., NeurIPS 2023; Liu et al. 2024 for the Cayley-Neumann form).

``W' = W R^T`` with ``R`` block-diagonal orthogonal (blocks of ``block_size``, Cayley transform of trainable
skew-symmetric blocks, identity at init); the rotation is applied to the layer's input, so the weight is never
copied in the forward. See :mod:`deltatune.deltas.rotation` for the formulas and the fused backward.

- ``cayley="exact"`` solves one ``b x b`` system per block; ``"neumann"`` uses ``terms`` terms of its series
  (PEFT's default) and avoids the solve; ``R`` is then orthogonal only up to ``O(|Q|^terms)``.
- ``radius``: COFT's constraint. After every optimizer step each block's skew matrix is projected back into the
  ball ``||Q_k||_F <= radius / sqrt(n_blocks)`` (projected gradient descent, as in the COFT code), which bounds
  how far ``R`` moves from the identity. ``None`` (default) leaves it free.
- ``block_size`` must divide every target layer's input size (32 suits most transformers).

Merging is multiplicative (``W <- W R^T``) and exact; :func:`deltatune.unmerge` undoes it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..deltas import Delta
from ..deltas.rotation import CAYLEY, RotationDelta
from .base import Controller, Method, StepInfo, adapter_dtype


def project_radius_(q: torch.Tensor, limit: float) -> None:
    """Scale each row ``q_k`` so that ``||Q_k||_F = sqrt(2) ||q_k|| <= limit`` (in place)."""
    norm = q.norm(dim=1, keepdim=True) * 2 ** 0.5
    q.mul_(torch.clamp(limit / norm.clamp_min(1e-30), max=1.0))


class RadiusController(Controller):
    """COFT: keep every block of every rotation within its radius after each optimizer step."""

    def __init__(self, deltas: list[RotationDelta], radius: float):
        self.deltas, self.radius = deltas, radius

    @torch.no_grad()
    def after_step(self, info: StepInfo) -> bool:
        for d in self.deltas:
            project_radius_(d.q, self.radius / d.blocks ** 0.5)
        return False


@dataclass
class OFT(Method):
    """Orthogonal fine-tuning with block-diagonal Cayley rotations of each target layer's input."""

    name = "oft"

    block_size: int = 32
    cayley: str = "exact"
    terms: int = 5
    radius: float | None = None

    def validate(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 2:
            raise ValueError(f"block_size must be an integer >= 2, got {self.block_size!r}")
        if self.cayley not in CAYLEY:
            raise ValueError(f"unknown cayley variant {self.cayley!r}; choose one of {CAYLEY}")
        if self.terms < 1:
            raise ValueError(f"terms must be >= 1, got {self.terms}")
        if self.radius is not None and self.radius <= 0:
            raise ValueError(f"radius must be positive (or None), got {self.radius}")

    def build(self, module_name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> RotationDelta:
        out_f, in_f = weight.shape
        if in_f % self.block_size:
            fits = [b for b in range(2, min(in_f, 256) + 1) if in_f % b == 0]
            near = sorted(fits, key=lambda b: abs(b - self.block_size))[:3]
            raise ValueError(f"{module_name}: block_size {self.block_size} does not divide its {in_f} inputs; "
                             f"choose one that does (nearest: {sorted(near)}) or exclude the layer")
        return RotationDelta(out_f, in_f, self.block_size, self.cayley, self.terms, dtype=adapter_dtype(weight),
                             device=weight.device)

    def controller(self, deltas: dict[str, Delta], model: nn.Module) -> Controller | None:
        if self.radius is None:
            return None
        return RadiusController([d for d in deltas.values() if isinstance(d, RotationDelta)], self.radius)
