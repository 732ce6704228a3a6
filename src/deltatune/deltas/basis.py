"""Low-rank deltas on *frozen* bases that are rebuilt from a seed (:mod:`deltatune.bases`), never saved.

- **Orthogonal Adaptation** (Po et al., CVPR 2024): ``dW = s * B A`` where the input-side ``A`` (r x in) is a
  frozen block of rows of a shared orthogonal basis ``O^T`` for this layer (same public seed and layer name on
  every machine) and only the output-side ``B`` (out x r, zero at init) trains. Adapters trained on disjoint
  slots have ``A_i A_j^T = 0``, so ``dW_i dW_j^T = 0`` and their sum interferes little.
- **VeRA** (Kopiczko et al., ICLR 2024): ``dW = diag(b) B diag(d) A`` with frozen random ``A`` (r x in) and ``B``
  (out x r) shared by all layers of one shape; only the vectors ``d`` (r, init ``d_init``) and ``b`` (out, init 0)
  train.
- **NOLA** (Koohpayegani et al., ICLR 2024): ``A = sum_i alpha_i A_i``, ``B = sum_j beta_j B_j`` over ``k_A`` and
  ``k_B`` frozen random bases; only the coefficients ``alpha`` (init random) and ``beta`` (init 0) train;
  ``dW = s * B A``.

All three are :class:`~deltatune.deltas.lowrank.FactoredDelta`: the forward, the fused kernel, merging and the
exact PEFT LoRA export are the low-rank ones, with the factors built from the coefficients each step (autograd
carries the gradient to them; a frozen factor costs no gradient at all). The frozen tensors are non-persistent
buffers: :meth:`spec` stores the seed and the layer key, :meth:`from_spec` regenerates them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import bases
from .lowrank import FactoredDelta


def _check_shapes(spec: dict, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{spec['structure']} tensor {name!r} has shape {tuple(tensors[name].shape)}, but the "
                             f"spec (out={spec['out_features']}, in={spec['in_features']}) needs {shape}")


class FrozenBasisDelta(FactoredDelta):
    """Shared parts: a dtype, no dropout by default, and rebuilding from ``spec`` + trainable tensors."""

    #: constructor arguments read back from the spec (besides out/in features)
    spec_keys: tuple[str, ...] = ()

    def __init__(self, out_features: int, in_features: int, scale: float, dropout: float, dtype: torch.dtype):
        super().__init__(out_features, in_features)
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self._dtype = dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def spec(self) -> dict:
        return {**super().spec(), "scale": self.scale, **{k: getattr(self, k) for k in self.spec_keys}}

    @classmethod
    def from_spec(cls, spec: dict, tensors: dict[str, torch.Tensor]):
        first = next(iter(tensors.values()))
        d = cls(spec["out_features"], spec["in_features"], scale=spec["scale"], dtype=first.dtype,
                dropout=spec.get("dropout", 0.0), **{k: spec[k] for k in cls.spec_keys})
        _check_shapes(spec, tensors, {k: tuple(v.shape) for k, v in d.state_dict().items()})
        d.load_state_dict(tensors)
        return d


class OrthogonalLowRankDelta(FrozenBasisDelta):
    """``dW = s * B A`` with ``A = O[:, columns]^T`` frozen (the layer's shared orthogonal basis) and ``B`` trainable."""

    structure = "orthogonal_lowrank"
    spec_keys = ("basis_seed", "key", "columns")

    def __init__(self, out_features: int, in_features: int, scale: float, basis_seed: int | str, key: str,
                 columns: list[int], dropout: float = 0.0, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(out_features, in_features, scale, dropout, dtype)
        self.basis_seed, self.key, self.columns = basis_seed, str(key), [int(c) for c in columns]
        self.r = len(self.columns)
        A = bases.basis_slot(basis_seed, self.key, in_features, self.columns, torch.float32)
        self.register_buffer("A", A.to(device=device, dtype=dtype), persistent=False)
        self.B = nn.Parameter(torch.zeros(out_features, self.r, dtype=dtype, device=device))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.B, self.A

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scale={self.scale:g}, basis_seed={self.basis_seed}"


def vera_bases(seed: int | str, r: int, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's shared frozen ``(B, A)``: Kaiming-uniform bounds ``1/sqrt(fan_in)`` (``B``: r, ``A``: in), one pair per
    layer shape."""
    A = bases.shared_uniform(seed, f"vera/A/{r}", (r, in_features), 1.0 / math.sqrt(in_features))
    B = bases.shared_uniform(seed, f"vera/B/{r}", (out_features, r), 1.0 / math.sqrt(r))
    return B, A


class VeRADelta(FrozenBasisDelta):
    """``dW = diag(b) B diag(d) A`` with shared frozen ``A, B`` and trainable vectors ``d`` (r,), ``b`` (out,)."""

    structure = "vera"
    spec_keys = ("basis_seed", "r")

    def __init__(self, out_features: int, in_features: int, r: int, basis_seed: int | str = 0, scale: float = 1.0,
                 d_init: float = 0.1, dropout: float = 0.0, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(out_features, in_features, scale, dropout, dtype)
        self.basis_seed, self.r = basis_seed, int(r)
        B, A = vera_bases(basis_seed, self.r, out_features, in_features)
        self.register_buffer("A", A.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("Bv", B.to(device=device, dtype=dtype), persistent=False)
        self.d = nn.Parameter(torch.full((self.r,), float(d_init), dtype=dtype, device=device))
        self.b = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(diag(b) B, diag(d) A)``."""
        return self.b[:, None] * self.Bv, self.d[:, None] * self.A

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, basis_seed={self.basis_seed}"


def nola_bases(seed: int | str, r: int, k_A: int, k_B: int, out_features: int, in_features: int):
    """NOLA's frozen bases ``(B_j: k_B x out x r, A_i: k_A x r x in)``, one set per layer shape."""
    A = bases.shared_uniform(seed, f"nola/A/{r}/{k_A}", (k_A, r, in_features), 1.0 / math.sqrt(in_features))
    B = bases.shared_uniform(seed, f"nola/B/{r}/{k_B}", (k_B, out_features, r), 1.0 / math.sqrt(r))
    return B, A


class NOLADelta(FrozenBasisDelta):
    """``dW = s * (sum_j beta_j B_j)(sum_i alpha_i A_i)`` with frozen random bases and trainable ``alpha, beta``."""

    structure = "nola"
    spec_keys = ("basis_seed", "r", "k_A", "k_B")

    def __init__(self, out_features: int, in_features: int, r: int, k_A: int, k_B: int, basis_seed: int | str = 0,
                 scale: float = 1.0, dropout: float = 0.0, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(out_features, in_features, scale, dropout, dtype)
        self.basis_seed, self.r, self.k_A, self.k_B = basis_seed, int(r), int(k_A), int(k_B)
        B, A = nola_bases(basis_seed, self.r, self.k_A, self.k_B, out_features, in_features)
        self.register_buffer("A_bases", A.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("B_bases", B.to(device=device, dtype=dtype), persistent=False)
        self.alpha = nn.Parameter(torch.zeros(self.k_A, dtype=dtype, device=device))
        self.beta = nn.Parameter(torch.zeros(self.k_B, dtype=dtype, device=device))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum_j beta_j B_j, sum_i alpha_i A_i)``: two small matrix-vector products over the basis index."""
        B = (self.beta @ self.B_bases.flatten(1)).view(self.out_features, self.r)
        A = (self.alpha @ self.A_bases.flatten(1)).view(self.r, self.in_features)
        return B, A

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, k_A={self.k_A}, k_B={self.k_B}, basis_seed={self.basis_seed}"
