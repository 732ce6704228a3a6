"""Merge-friendly low-rank methods on frozen, seed-generated bases: Orthogonal Adaptation, VeRA, NOLA.

**Orthogonal Adaptation** (Po, Yang, Aberman, Wetzstein; CVPR 2024). ``dW_i = s * B_i A_i`` with the input-side
``A_i`` (r x in) *frozen* and the output-side ``B_i`` (out x r, zero at init) trained. Every layer has one shared
orthogonal basis ``O`` (in x in) derived from a public seed and the layer's name (:mod:`deltatune.bases`); adapter
``i`` uses ``A_i = O[:, J_i]^T`` for its slot ``J_i``. With disjoint slots ``A_i A_j^T = 0``, hence
``dW_i dW_j^T = 0``: people who never see each other train adapters that can later be summed,
``W + sum_i lambda_i dW_i`` (the paper uses ``lambda = 0.6``), with little cross-talk. The leftover cross-talk on
adapter ``i``'s inputs, ``dW_j x_i``, is small but not zero; :func:`deltatune.interference` measures it.

- ``slot=k`` takes columns ``[k r, (k+1) r)``: slots are mutually orthogonal by construction; a layer with
  ``in < (k+1) r`` inputs has no room and attach fails with the layer's name;
- ``slot="random"`` draws ``r`` columns per layer from ``slot_seed``; left at ``None``, a fresh seed is drawn when the config
  is made and recorded in it, so independent users do not collide (two random slots overlap in about ``r^2 / in``
  columns: unlikely only when ``r << in``);
- ``basis_seed`` must be the same for every adapter meant to be merged (it is public: the default 0 is fine);
- the layer key is the module name *as seen by attach* (``bert.encoder.layer.0...`` differs from
  ``encoder.layer.0...``): adapters to be merged must be attached to the same model class.

**VeRA** (Kopiczko, Blankevoort, Asano; ICLR 2024): ``dW = diag(b) B diag(d) A``, frozen random ``A, B`` shared by
all layers of one shape, trainable ``d`` (init ``d_init = 0.1``) and ``b`` (init 0). Typical ``r`` is large
(256): the trainable count is ``r + out`` per layer.

**NOLA** (Koohpayegani et al., ICLR 2024): ``A = sum_i alpha_i A_i`` and ``B = sum_j beta_j B_j`` over ``k_A``,
``k_B`` frozen random bases; only ``alpha`` (init ``U(-1/sqrt(k_A), 1/sqrt(k_A))`` from ``seed``) and ``beta``
(init 0) train: ``k_A + k_B`` numbers per layer, whatever its size. ``dW = (alpha / r) B A``.

Checkpoints of all three store the seed and the slot, not the frozen matrices; they export exactly to a PEFT
LoRA (the factors are materialized).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from .. import bases
from ..deltas.basis import NOLADelta, OrthogonalLowRankDelta, VeRADelta
from .base import Method, adapter_dtype, check_dropout
from .lora import lora_scale


def fresh_seed() -> int:
    """A random seed, drawn locally (no collective: a config may be made on one rank only, or before the process
    group exists); :func:`rank0_seed` makes the ranks agree when the adapter is attached."""
    return secrets.randbits(31)


def rank0_seed(seed: int) -> int:
    """``seed`` as rank 0 has it under ``torch.distributed`` (every rank attaches: a collective is safe there)."""
    t = torch.tensor([seed])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(t, 0)
    return int(t)


def _check_positive(**values) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


@dataclass
class OrthogonalAdaptation(Method):
    """Low-rank adapter whose input-side factor is a frozen slot of a shared orthogonal basis (only ``B`` trains).
    ``alpha`` defaults to ``r`` (scale 1)."""

    name = "orthogonal"

    r: int = 8
    alpha: float | None = None
    slot: int | str = 0
    basis_seed: int = 0
    slot_seed: int | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        """``slot="random"`` without ``slot_seed``: draw a fresh seed now, so the config records it (attaching
        makes every rank use rank 0's)."""
        if self.slot == "random" and self.slot_seed is None:
            self.slot_seed = fresh_seed()

    def validate(self) -> None:
        _check_positive(r=self.r)
        check_dropout(self.dropout)
        if self.slot == "random" and self.slot_seed is None:  # slot changed to "random" after construction
            raise ValueError("OrthogonalAdaptation(slot='random') needs slot_seed: give one, or leave it unset when "
                             "constructing the config and a fresh one is drawn")

    def build_all(self, model, layers, data=None):
        """Under ``torch.distributed`` every rank takes rank 0's ``slot_seed`` first (ranks may have drawn their own
        configs), so all ranks build the same slots and the saved config records the seed used."""
        if self.slot == "random":
            self.slot_seed = rank0_seed(self.slot_seed)
        return super().build_all(model, layers, data)

    def build(self, module_name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> OrthogonalLowRankDelta:
        out_f, in_f = weight.shape
        try:
            cols = bases.slot_columns(self.slot, self.r, in_f, self.slot_seed, module_name)
        except ValueError as e:
            raise ValueError(f"{module_name}: {e}") from None
        s = lora_scale(self.alpha if self.alpha is not None else self.r, self.r)
        return OrthogonalLowRankDelta(out_f, in_f, s, self.basis_seed, module_name, cols, self.dropout,
                                      dtype=adapter_dtype(weight), device=weight.device)


@dataclass
class VeRA(Method):
    """Vector-based random matrix adaptation: frozen shared random ``A, B``; trainable scaling vectors ``d, b``."""

    name = "vera"

    r: int = 256
    d_init: float = 0.1
    basis_seed: int = 0
    dropout: float = 0.0

    def validate(self) -> None:
        _check_positive(r=self.r)
        check_dropout(self.dropout)

    def build(self, module_name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> VeRADelta:
        out_f, in_f = weight.shape
        return VeRADelta(out_f, in_f, self.r, self.basis_seed, 1.0, self.d_init, self.dropout,
                         dtype=adapter_dtype(weight), device=weight.device)


@dataclass
class NOLA(Method):
    """LoRA factors as linear combinations of ``k_A`` / ``k_B`` frozen random bases; only the coefficients train."""

    name = "nola"

    r: int = 8
    k_A: int = 64
    k_B: int = 64
    alpha: float | None = None
    basis_seed: int = 0
    seed: int = 0
    dropout: float = 0.0

    def validate(self) -> None:
        _check_positive(r=self.r, k_A=self.k_A, k_B=self.k_B)
        check_dropout(self.dropout)

    def build(self, module_name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> NOLADelta:
        out_f, in_f = weight.shape
        s = lora_scale(self.alpha if self.alpha is not None else self.r, self.r)
        delta = NOLADelta(out_f, in_f, self.r, self.k_A, self.k_B, self.basis_seed, s, self.dropout,
                          dtype=adapter_dtype(weight), device=weight.device)
        bound = self.k_A ** -0.5
        with torch.no_grad():
            delta.alpha.copy_(bases.uniform(self.seed, f"nola/alpha/{module_name}", (self.k_A,), -bound, bound))
        return delta
