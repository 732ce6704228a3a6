"""Full replacement: the module's own weight and bias train, ``dW = W' - W``, ``db = b' - b``.

Used for small modules that must train in full alongside an adapter, typically a freshly initialized
classification head (PEFT calls these ``modules_to_save``). The delta keeps a frozen copy ``W`` of the weight it
replaces so that merge and unmerge stay exact and the checkpoint stores the trained values ``W'`` (a fresh base
with a differently initialized head gets exactly the trained head back).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Delta, PeftTensors


def shifted_sum(p0: torch.Tensor, terms: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """``p0 + sum_i w_i (p_i - q_i)`` for ``terms = [(p_i, q_i, w_i)]``, accumulated in float32."""
    out = p0.detach().float().clone()
    for p, q, w in terms:
        out += w * (p.detach().float() - q.detach().float())
    return out.to(p0.dtype)


class FullDelta(Delta):
    """``y = W' x + b'`` in place of ``y = W x + b``; expressed additively as ``(W' - W) x + (b' - b)``."""

    structure = "full"
    replaces_output = True
    needs_base = True
    whole_module = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        out_features, in_features = weight.shape
        super().__init__(out_features, in_features)
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.register_buffer("weight0", weight.detach().clone(), persistent=False)
        self.register_buffer("bias0", bias.detach().clone() if bias is not None else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.dense(), self.dense_bias())

    def replace(self, x: torch.Tensor, embedding: bool = False) -> torch.Tensor:
        """``W' x + b'`` computed directly, so a loaded head gives bit-identical outputs on any base."""
        if embedding:
            return F.embedding(x, self.weight.t())
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)

    def dense(self) -> torch.Tensor:
        return self.weight - self.weight0

    def dense_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias - self.bias0

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"weight": self.weight.detach()}
        if self.bias is not None:
            t["bias"] = self.bias.detach()
        return t

    def bind(self, layer) -> None:
        """Point the frozen reference at the weight this delta sits on (a loaded head replaces a fresh one)."""
        super().bind(layer)
        weight, bias = self.base_weight()
        self.weight0 = weight.detach().clone()
        self.bias0 = None if bias is None else bias.detach().clone()

    @classmethod
    def peft_export(cls, spec, tensors, build, rank=None, energy=None) -> PeftTensors:
        """A module trained whole is PEFT's ``modules_to_save`` entry: its trained ``weight`` (and ``bias``) as they
        are, no base weight needed."""
        return PeftTensors(saved={k: tensors[k] for k in ("weight", "bias") if k in tensors})

    @classmethod
    def weighted_sum(cls, terms: list[tuple["FullDelta", float]]) -> "FullDelta":
        """``W0 + sum_i w_i (W'_i - W0)`` and the bias alike: one whole module, relative to the base ``W0``, ``b0``
        that every term sits on (weights summing to 1 average the trained modules)."""
        first = terms[0][0]
        weight = shifted_sum(first.weight0, [(d.weight, d.weight0, w) for d, w in terms])
        bias = None if first.bias is None else shifted_sum(first.bias0, [(d.bias, d.bias0, w) for d, w in terms])
        out = cls(weight, bias)
        out.weight0 = first.weight0.clone()
        out.bias0 = None if first.bias0 is None else first.bias0.clone()
        return out

    @classmethod
    def from_spec(cls, spec: dict, tensors: dict[str, torch.Tensor]) -> "FullDelta":
        w = tensors["weight"]
        if tuple(w.shape) != (spec["out_features"], spec["in_features"]):
            raise ValueError(f"full-replacement weight has shape {tuple(w.shape)}, spec says "
                             f"({spec['out_features']}, {spec['in_features']})")
        return cls(w, tensors.get("bias"))
