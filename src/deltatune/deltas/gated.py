"""Gated SVD triplets: ``dW = s * P @ diag(lam * mask) @ Q``.

- ``P`` (out x r): left "singular vectors", ``Q`` (r x in): right ones, ``lam`` (r,): the gates (singular values),
  ``mask`` (r,): a frozen 0/1 buffer that switches components off without touching ``lam``.
- ``s`` is a constant scale. AdaLoRA (Zhang et al., 2023) uses ``alpha / init_r`` and keeps it when ranks are
  pruned; SoRA uses ``alpha / r_max``; IncreLoRA ``alpha / current rank``. The delta does not care: the method
  sets ``s``.

The triplet ``i`` is *live* when ``lam_i * mask_i != 0``. The forward folds the gates into the input-side factor,
``A' = diag(lam * mask) Q`` (an r x in elementwise product), and runs the low-rank kernels of
:mod:`deltatune.deltas.lowrank` with ``(B', A') = (P, A')``; autograd carries ``dL/dA'`` back to ``lam`` and
``Q`` (``dL/dQ = diag(lam * mask) dL/dA'``, ``dL/dlam = mask * rowsum(Q * dL/dA')``). Merge uses the same folded
factors; export to PEFT LoRA is exact with the gates folded into ``P`` (``B = P diag(g)``, ``A = Q``).

An optional frozen *anchor* ``(P0, lam0, Q0)`` makes the delta ``s (P diag(lam * mask) Q - P0 diag(lam0) Q0)``: SORSA
starts from the top singular triplets of ``W`` and trains them on the residual ``W - s P0 diag(lam0) Q0`` without
rewriting ``W`` (as :class:`~deltatune.deltas.lowrank.LowRankDelta`'s anchor does for PiSSA). Checkpoints keep the
anchor as frozen tensors (training resumes on the same parameters); exported to PEFT it is folded in:
``[P | -P0] diag([lam ; lam0]) [Q ; Q0]`` is a plain LoRA of twice the rank.

Components can be removed (:meth:`GatedSVDDelta.keep_`) or added (:meth:`GatedSVDDelta.grow_`): the delta
gets new parameter tensors of the new size (autograd caches a leaf's shape, so a tensor cannot change size in
place); :mod:`deltatune.budget.resize` moves gradients, optimizer state and param groups over to them.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..sharding import refuse_replacing
from .lowrank import FactoredDelta

#: the layer kinds PEFT's AdaLoRA adapts (``None``: a checkpoint read without a model to look at)
PEFT_ADALORA_KINDS = (None, "linear")
#: the dimension that indexes components, per tensor
COMPONENT_DIMS = {"P": 1, "lam": 0, "Q": 0, "mask": 0}


class GatedSVDDelta(FactoredDelta):
    """``dW = s * P diag(lam * mask) Q`` with trainable ``P`` (out x r), ``lam`` (r,), ``Q`` (r x in)."""

    structure = "gated_svd"
    #: for :mod:`deltatune.budget.resize`: which dimension of each tensor indexes the components
    component_dims = COMPONENT_DIMS

    def __init__(self, out_features: int, in_features: int, r: int, scale: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 anchored: bool = False):
        super().__init__(out_features, in_features)
        if r < 0:
            raise ValueError(f"number of components r must be >= 0, got r={r}")
        self.scale = float(scale)
        self.P = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))
        self.lam = nn.Parameter(torch.zeros(r, dtype=dtype, device=device))
        self.Q = nn.Parameter(torch.zeros(r, in_features, dtype=dtype, device=device))
        self.register_buffer("mask", torch.ones(r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        if anchored:
            self.register_buffer("P0", torch.zeros(out_features, r, dtype=dtype, device=device))
            self.register_buffer("lam0", torch.zeros(r, dtype=dtype, device=device))
            self.register_buffer("Q0", torch.zeros(r, in_features, dtype=dtype, device=device))
        else:
            self.P0 = self.lam0 = self.Q0 = None

    def anchor_(self) -> None:
        """Freeze the current triplets as the anchor (right after a residual initialization)."""
        with torch.no_grad():
            self.P0.copy_(self.P)
            self.lam0.copy_(self.gate())
            self.Q0.copy_(self.Q)

    @property
    def dtype(self) -> torch.dtype:
        return self.Q.dtype

    @property
    def r(self) -> int:
        """Number of components held (live or not)."""
        return self.lam.shape[0]

    def gate(self) -> torch.Tensor:
        """``lam * mask``: the effective singular values."""
        return self.lam * self.mask

    def live(self) -> torch.Tensor:
        """Boolean (r,): components that contribute (``lam * mask != 0``)."""
        return self.gate().detach() != 0

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, diag(lam * mask) Q)``, or ``([P | -P0], [diag(lam * mask) Q ; diag(lam0) Q0])`` when anchored."""
        A = self.gate()[:, None] * self.Q
        if self.P0 is None:
            return self.P, A
        return torch.cat([self.P, -self.P0], dim=1), torch.cat([A, self.lam0[:, None] * self.Q0], dim=0)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(P, g, Q)`` (detached) of the equivalent plain gated delta over the kept components: the gates are
        ``lam * mask``; an anchor is appended as ``(-P0, lam0, Q0)``."""
        keep = self.mask.detach() != 0
        P, g, Q = self.P.detach()[:, keep], self.gate().detach()[keep], self.Q.detach()[keep]
        if self.P0 is not None:
            P, g, Q = torch.cat([P, -self.P0], 1), torch.cat([g, self.lam0]), torch.cat([Q, self.Q0])
        return P.contiguous(), g.contiguous(), Q.contiguous()

    def lowrank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The exact LoRA ``(B, A, s) = (P diag(g), Q, s)`` over the live components (for export)."""
        P, g, Q = self.folded()
        live = g != 0
        return (P * g)[:, live].contiguous(), Q[live].contiguous(), self.scale

    # -- changing the set of components --------------------------------------------------------------------
    def set_mask(self, mask: torch.Tensor) -> None:
        """Switch components on (1) or off (0) without touching their parameters."""
        self.mask.copy_(mask.to(self.mask.dtype))

    def _check_resizable(self) -> None:
        refuse_replacing(self, "lam", "resize the components of an SVD delta (AdaLoRA's shrink, IncreLoRA's growth, "
                         "SoRA's pruning)", "Use AdaLoRA(shrink='never') (the pruned components stay behind a mask, "
                         "shapes fixed; the export drops them), or train IncreLoRA / SoRA with DDP")

    def _replace(self, name: str, value: torch.Tensor) -> None:
        old = getattr(self, name)
        if isinstance(old, nn.Parameter):
            value = nn.Parameter(value, requires_grad=old.requires_grad)
        setattr(self, name, value)

    @torch.no_grad()
    def keep_(self, index: torch.Tensor) -> None:
        """Keep only components ``index`` (a LongTensor); ``P``, ``lam``, ``Q`` become new parameters."""
        self._check_resizable()
        index = index.to(self.lam.device)
        for name, dim in COMPONENT_DIMS.items():
            self._replace(name, getattr(self, name).detach().index_select(dim, index).contiguous())

    @torch.no_grad()
    def grow_(self, n: int, std: float = 0.02, lam: float = 0.0, generator: torch.Generator | None = None) -> None:
        """Append ``n`` components, ``P, Q ~ N(0, std^2)`` and ``lam`` set to ``lam`` (new parameters)."""
        self._check_resizable()
        like = dict(dtype=self.dtype, device=self.Q.device)
        new = {"P": torch.randn(self.out_features, n, generator=generator, **like) * std,
               "lam": torch.full((n,), float(lam), **like),
               "Q": torch.randn(n, self.in_features, generator=generator, **like) * std,
               "mask": torch.ones(n, **like)}
        for name, dim in COMPONENT_DIMS.items():
            self._replace(name, torch.cat([getattr(self, name).detach(), new[name]], dim=dim))

    @torch.no_grad()
    def set_components_(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace ``P``, ``lam``, ``Q`` and ``mask`` by ``tensors`` (all components, masked-off ones included, as a
        controller keeps them to resume training); new parameters, shapes checked against the delta's."""
        self._check_resizable()
        r = tensors["lam"].shape[0]
        want = {"P": (self.out_features, r), "lam": (r,), "Q": (r, self.in_features), "mask": (r,)}
        for name, shape in want.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, expected {shape}")
        like = dict(dtype=self.dtype, device=self.Q.device)
        for name in want:
            self._replace(name, tensors[name].to(**like).clone())

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def spec(self) -> dict:
        return {**super().spec(), "r": int((self.mask != 0).sum()), "scale": self.scale}

    @classmethod
    def spec_for(cls, out_features: int, in_features: int, r: int, scale: float, layer: str | None = None) -> dict:
        """The spec of ``r`` gated triplets with scale ``scale`` on a ``layer`` kind."""
        return super().spec_for(out_features, in_features, layer, r=int(r), scale=scale)

    # -- PEFT checkpoints: AdaLoRA's triplets in, an exact LoRA out (FactoredDelta.lowrank via peft_export) -------
    @classmethod
    def peft_names(cls) -> tuple[str, ...]:
        """PEFT AdaLoRA's tensor names: ``lora_A`` = ``Q`` (r x in), ``lora_E`` = ``lam`` (r x 1), ``lora_B`` = ``P``."""
        return ("lora_A", "lora_B", "lora_E")

    @classmethod
    def from_peft(cls, mod: str, found: dict[str, torch.Tensor], kind: str | None, rank: int | None,
                  scale: Callable[[int], float], source: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """``(spec, tensors)`` of module ``mod`` from a PEFT AdaLoRA triplet (already cut to its final ranks, so
        ``rank`` is not checked); PEFT's AdaLoRA adapts Linear layers only (``kind`` must be that or unknown)."""
        if set(found) != set(cls.peft_names()):
            raise ValueError(f"{source}: PEFT AdaLoRA checkpoint has an incomplete triplet for {mod!r} (found {sorted(found)})")
        if kind not in PEFT_ADALORA_KINDS:
            raise ValueError(f"{source}: PEFT AdaLoRA on {mod!r} (a {kind}): deltatune imports AdaLoRA on Linear layers")
        Q, lam, P = found["lora_A"], found["lora_E"].reshape(-1), found["lora_B"]
        r = int(lam.shape[0])
        return cls.spec_for(P.shape[0], Q.shape[1], r, scale(r), layer=kind), {"P": P, "lam": lam, "Q": Q}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Masked-off components are dropped; the gates are saved as ``lam * mask``; an anchor as ``P0, lam0, Q0``."""
        keep = self.mask.detach() != 0
        out = {"P": self.P.detach()[:, keep].contiguous(), "lam": self.gate().detach()[keep].contiguous(),
               "Q": self.Q.detach()[keep].contiguous()}
        if self.P0 is not None:
            out.update(P0=self.P0.detach(), lam0=self.lam0.detach(), Q0=self.Q0.detach())
        return out

    @classmethod
    def from_spec(cls, spec: dict, tensors: dict[str, torch.Tensor]) -> "GatedSVDDelta":
        P, lam, Q = tensors["P"], tensors["lam"], tensors["Q"]
        r, out_f, in_f = int(spec["r"]), spec["out_features"], spec["in_features"]
        if P.shape != (out_f, r) or lam.shape != (r,) or Q.shape != (r, in_f):
            raise ValueError(f"gated-SVD tensors have shapes P{tuple(P.shape)}, lam{tuple(lam.shape)}, "
                             f"Q{tuple(Q.shape)}, but the spec says r={r}, in={in_f}, out={out_f}")
        anchored = "P0" in tensors
        if anchored and (tensors["P0"].shape != P.shape or tensors["Q0"].shape != Q.shape):
            raise ValueError(f"gated-SVD anchor shapes P0{tuple(tensors['P0'].shape)}, Q0{tuple(tensors['Q0'].shape)}"
                             f" do not match P{tuple(P.shape)}, Q{tuple(Q.shape)}")
        d = cls(out_f, in_f, r, spec["scale"], dropout=spec.get("dropout", 0.0), dtype=Q.dtype, anchored=anchored)
        with torch.no_grad():
            for name in ("P", "lam", "Q", *(("P0", "lam0", "Q0") if anchored else ())):
                getattr(d, name).copy_(tensors[name])
        return d

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, live={int(self.live().sum())}, scale={self.scale:g}"
