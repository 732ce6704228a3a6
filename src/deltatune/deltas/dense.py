"""Dense additive delta: ``dW = D`` stored in full (out x in).

The exact form of any combination of deltas that no compact structure represents (a TIES or DARE merge, a sum of
sparse, sliced and rotation deltas). Costs one extra product with ``D`` per forward; export to PEFT by truncated
SVD (``rank=``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Delta


class DenseDelta(Delta):
    """``y = W x + b + D x`` with ``D`` (out x in) a parameter."""

    structure = "dense"

    def __init__(self, D: torch.Tensor):
        super().__init__(*D.shape)
        self.D = nn.Parameter(D.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.D.dtype), self.D)

    def dense(self) -> torch.Tensor:
        return self.D

    @classmethod
    def weighted_sum(cls, terms: list[tuple["DenseDelta", float]]) -> "DenseDelta":
        return cls(sum(d.D.detach().float() * w for d, w in terms))

    @classmethod
    def from_spec(cls, spec: dict, tensors: dict[str, torch.Tensor]) -> "DenseDelta":
        D = tensors["D"]
        if tuple(D.shape) != (spec["out_features"], spec["in_features"]):
            raise ValueError(f"dense delta D has shape {tuple(D.shape)}, spec says "
                             f"({spec['out_features']}, {spec['in_features']})")
        return cls(D)
