"""KIND components: SVD triplets gated per sample by its class (Xie et al., "KIND: Knowledge Integration and
Diversion", arXiv 2408.07337 / ICML 2025).

A weight ``W`` (out x in) is expressed by components ``(u_i, sigma_i, v_i)``; for a sample of class ``c`` the layer
uses

    W_c = W - U0 diag(sigma0) Vh0 + U_L diag(sigma_L) Vh_L + U_T diag(sigma_T * m_c) Vh_T

- the ``G`` *learngenes* ``(U_L, sigma_L, Vh_L)`` are always on (class-agnostic knowledge);
- the *tailors* ``(U_T, sigma_T, Vh_T)`` are ``n_groups`` blocks of ``T`` components, block ``k`` holding columns
  ``k T .. (k + 1) T - 1``; the gate ``m_c`` (length ``n_groups T``) switches on the block of class ``c``'s group
  ``g(c)`` (hard gate, ``m_c = onehot(g(c)) (x) 1_T``), or weighs the blocks by ``softmax(logits_c)`` (soft gate);
  a class whose group is ``-1`` (a classifier-free-guidance null class) uses the learngenes alone;
- ``U0 diag(sigma0) Vh0`` is the frozen *anchor*: the SVD components of ``W`` the trainable ones started from, so
  that training changes components instead of ``W``. With as many components as ``W`` has singular values the
  anchor is ``W`` itself (to rounding) and ``W_c`` is the components alone: a *decomposable* model. Without an
  anchor the components are added to ``W`` (they start at ``sigma = 0``).

As a delta, ``dW_c = B diag(r_c) A`` with ``B = [U_L | U_T | -U0]``, ``A = [sigma_L * Vh_L ; sigma_T * Vh_T ;
sigma0 * Vh0]`` and the per-row gate ``r_c = [1_G ; m_c ; 1_{r0}]``: one product ``u = x A^T`` for the whole batch,
each row's ``u`` multiplied by its own gate, one product ``u B^T`` (no loop over rows or classes; every layer kind
that applies a delta as two products, a convolution as LoCon included, runs it). The class of every row comes from
the batch (:attr:`KindDelta.condition`, set by :mod:`deltatune.conditioning`); :meth:`KindDelta.select` fixes one
gate for every row instead (a class, or ``"learngenes"``: every tailor off), and only then is the delta one fixed
``dW`` that merges, exports and combines (the exact LoRA of the live components).

Frozen learngenes (after a transfer) are buffers: the adapter's parameters are then exactly the tailors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lowrank import FactoredDelta

#: ``KindDelta.select`` value: every tailor off (the learngene-only update)
LEARNGENES = "learngenes"
GATES = ("hard", "soft")
#: the tensors of a KIND delta: learngenes, tailors, anchor (each ``(U, sigma, Vh)``)
PARTS = {"L": ("U_L", "sigma_L", "Vh_L"), "T": ("U_T", "sigma_T", "Vh_T"), "0": ("U0", "sigma0", "Vh0")}


# -- pure tensor math -------------------------------------------------------------------------------------------------
def expand_rows(values: torch.Tensor, n: int) -> torch.Tensor:
    """Per-row values for a tensor of ``n`` rows whose rows expand the batch's ``len(values)`` rows in order
    (``k`` consecutive copies of each: ``rows x tokens`` flattened, or several samples per prompt)."""
    if n == values.shape[0]:
        return values
    if n % values.shape[0]:
        raise ValueError(f"the batch condition has {values.shape[0]} entries, but a layer got {n} rows; give one "
                         "class per sample of the batch")
    return values.repeat_interleave(n // values.shape[0], dim=0)


def tailor_gate(groups: torch.Tensor, n_groups: int, T: int, logits: torch.Tensor | None = None) -> torch.Tensor:
    """``m`` (n, n_groups T) for the tailor groups ``groups`` (n,) of n samples: ``onehot(g) (x) 1_T`` (hard), or
    ``softmax(logits) (x) 1_T`` for per-sample logits (n, n_groups) (soft); rows with group ``-1`` are all zero."""
    off = groups < 0
    if logits is None:
        m = F.one_hot(groups.clamp_min(0), n_groups).to(torch.float32)
    else:
        m = torch.softmax(logits.float(), dim=-1)
    m = m.masked_fill(off[:, None], 0.0)
    return m.repeat_interleave(T, dim=1)


def orthonormal(n: int, k: int, generator: torch.Generator | None = None, against: torch.Tensor | None = None,
                dtype=torch.float32) -> torch.Tensor:
    """``k`` orthonormal columns (n x k) in random directions, orthogonal to the columns of ``against`` where
    ``n`` leaves room (else as orthogonal as the room allows): new tailors that do not repeat the learngenes."""
    X = torch.randn(n, k, generator=generator, dtype=torch.float64)
    if against is not None and against.shape[1] and against.shape[1] + k <= n:
        Q0, _ = torch.linalg.qr(against.double())
        X = X - Q0 @ (Q0.t() @ X)
    if k > n:
        return (X / n ** 0.5).to(dtype)
    Q, R = torch.linalg.qr(X)
    sign = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q.dtype)  # a unique Q for a given draw
    return (Q * sign).to(dtype)


class KindDelta(FactoredDelta):
    """``dW_c = [U_L | U_T | -U0] diag([1 ; m_c ; 1]) [sigma_L Vh_L ; sigma_T Vh_T ; sigma0 Vh0]`` (module docstring).

    ``groups`` (buffer, one entry per class): the tailor group of each class, ``-1`` for learngenes only, ``-2`` for a
    class removed by a recombination; ``logits`` (soft gate only, trainable, n_classes x n_groups)."""

    structure = "kind"

    def __init__(self, out_features: int, in_features: int, n_learngenes: int, n_tailors: int, n_groups: int,
                 groups: torch.Tensor, r_anchor: int = 0, gate: str = "hard", frozen_learngenes: bool = False,
                 dropout: float = 0.0, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(out_features, in_features)
        if gate not in GATES:
            raise ValueError(f"KIND gate must be one of {GATES}, got {gate!r}")
        self.scale = 1.0
        self.n_learngenes, self.n_tailors, self.n_groups = int(n_learngenes), int(n_tailors), int(n_groups)
        self.gate, self.frozen_learngenes = gate, bool(frozen_learngenes)
        like = dict(dtype=dtype, device=device)
        G, R = self.n_learngenes, self.n_groups * self.n_tailors
        learngenes = {"U_L": torch.zeros(out_features, G, **like), "sigma_L": torch.zeros(G, **like),
                      "Vh_L": torch.zeros(G, in_features, **like)}
        for name, t in learngenes.items():
            if self.frozen_learngenes:
                self.register_buffer(name, t)
            else:
                setattr(self, name, nn.Parameter(t))
        self.U_T = nn.Parameter(torch.zeros(out_features, R, **like))
        self.sigma_T = nn.Parameter(torch.zeros(R, **like))
        self.Vh_T = nn.Parameter(torch.zeros(R, in_features, **like))
        self.register_buffer("groups", groups.to(torch.long).to(device).clone())
        self.logits = nn.Parameter(torch.zeros(groups.shape[0], self.n_groups, **like)) if gate == "soft" else None
        for name, t in {"U0": torch.zeros(out_features, r_anchor, **like), "sigma0": torch.zeros(r_anchor, **like),
                        "Vh0": torch.zeros(r_anchor, in_features, **like)}.items():
            self.register_buffer(name, t)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        #: the class of every row of the running batch (set per forward by :mod:`deltatune.conditioning`)
        self.condition: torch.Tensor | None = None
        self._select: int | str | None = None

    # -- sizes -------------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.Vh_T.dtype

    @property
    def n_classes(self) -> int:
        return int(self.groups.shape[0])

    @property
    def r_anchor(self) -> int:
        return int(self.sigma0.shape[0])

    @property
    def r(self) -> int:
        """Trainable components held (learngenes and tailors)."""
        return self.n_learngenes + self.n_groups * self.n_tailors

    # -- the gate -------------------------------------------------------------------------------------------------
    def select(self, which: int | str | None) -> None:
        """Fix the gate of every row: class ``which``, ``"learngenes"`` (every tailor off), or ``None`` (per row,
        from the batch's condition; the default)."""
        if which is not None and which != LEARNGENES:
            self.check_condition(torch.tensor([which]))
            which = int(which)
        self._select = which

    @property
    def selected(self) -> int | str | None:
        return self._select

    @property
    def routed(self) -> bool:
        """True when every row has its own gate (no fixed selection): apply :meth:`row_gate` between the
        factors."""
        return self._select is None

    def check_condition(self, classes: torch.Tensor) -> None:
        """``ValueError`` for class ids that are not in the tailor table (or were removed)."""
        if classes.dtype.is_floating_point or classes.dtype == torch.bool:
            raise ValueError(f"KIND needs integer class ids, got a {classes.dtype} tensor")
        if classes.numel() == 0:
            return
        lo, hi = int(classes.min()), int(classes.max())
        if lo < 0 or hi >= self.n_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"class id {bad} is outside the KIND tailor table (classes 0..{self.n_classes - 1}); "
                             "dt.kind_transfer(model, n_classes=...) makes a table for new classes")
        removed = self.groups.index_select(0, classes.reshape(-1).to(self.groups.device)) == -2
        if bool(removed.any()):
            bad = int(classes.reshape(-1)[removed.cpu()][0])
            raise ValueError(f"class {bad} was removed from this KIND model by dt.kind_recombine; its tailors are gone")

    def condition_values(self, values: torch.Tensor) -> torch.Tensor:
        """The batch's class ids as this delta keeps them (checked, flat, on its device)."""
        if values.dim() > 1:
            raise ValueError(f"the KIND condition must be one class id per sample, got a tensor of shape "
                             f"{tuple(values.shape)}")
        values = values.reshape(-1).to(self.groups.device)
        self.check_condition(values)
        return values

    def gate_for(self, classes: torch.Tensor) -> torch.Tensor:
        """``[1_G ; m_c ; 1_{r0}]`` (n x (G + n_groups T + r0)) for classes ``classes`` (n,)."""
        groups = self.groups.index_select(0, classes.to(self.groups.device))
        logits = None if self.logits is None else self.logits.index_select(0, classes.to(self.logits.device))
        m = tailor_gate(groups, self.n_groups, self.n_tailors, logits).to(self.dtype)
        n = classes.shape[0]
        ones = m.new_ones(n, self.n_learngenes), m.new_ones(n, self.r_anchor)
        return torch.cat([ones[0], m, ones[1]], dim=1)

    def fixed_gate(self) -> torch.Tensor:
        """The gate of the selection (length G + n_groups T + r0)."""
        if self._select is None:
            raise ValueError("this KIND delta gates each sample by its class; choose one gate first with "
                             "dt.kind_select(model, class_id) or dt.kind_select(model, 'learngenes')")
        if self._select == LEARNGENES:
            g = torch.ones(self.r + self.r_anchor, dtype=self.dtype, device=self.Vh_T.device)
            g[self.n_learngenes: self.r] = 0
            return g
        return self.gate_for(torch.tensor([self._select]))[0]

    def row_gate(self, n: int) -> torch.Tensor:
        """The gate of each of ``n`` rows (n x rank) from the batch's condition."""
        if self.condition is None:
            raise ValueError("this KIND adapter gates every sample by its class, but the batch gave none: call the "
                             "model with the condition its config names (e.g. model(x, t, class_labels=y)) or "
                             "condition=..., or fix one gate with dt.kind_select(model, class_id)")
        return self.gate_for(expand_rows(self.condition, n))

    # -- factors ---------------------------------------------------------------------------------------------------
    def all_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` before the gate: ``[U_L | U_T | -U0]``, ``[sigma_L Vh_L ; sigma_T Vh_T ; sigma0 Vh0]``."""
        B = torch.cat([self.U_L, self.U_T, -self.U0], dim=1)
        A = torch.cat([self.sigma_L[:, None] * self.Vh_L, self.sigma_T[:, None] * self.Vh_T,
                       self.sigma0[:, None] * self.Vh0], dim=0)
        return B, A

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, diag(r) A)`` for the selected gate ``r`` (components it switches off left out)."""
        B, A = self.all_factors()
        g = self.fixed_gate()
        keep = g != 0
        return B[:, keep], g[keep, None] * A[keep]

    def live_factors(self):
        """With a per-row gate: ``(B, A, 1)`` before the gate (layer kinds then multiply by :meth:`row_gate`)."""
        if self.routed:
            B, A = self.all_factors()
            return B, A, 1.0
        return super().live_factors()

    def lowrank(self):
        """The exact LoRA of the selected gate; ``None`` while rows are gated by the batch's condition (mixed-batch
        serving then runs this delta grouped); no selection and no condition: ``ValueError``."""
        if self.routed and self.condition is not None:
            return None
        return super().lowrank()

    # -- application with a per-row gate ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.routed:
            return super().forward(x)
        B, A = self.all_factors()
        x2 = self._input(x).reshape(-1, self.in_features)
        u = (x2 @ A.t()) * self.row_gate(x2.shape[0])
        return (u @ B.t()).reshape(*x.shape[:-1], self.out_features)

    def add_to(self, out: torch.Tensor, x: torch.Tensor, inplace: bool = True) -> torch.Tensor:
        if not self.routed:
            return super().add_to(out, x, inplace)
        return out + self(x).to(out.dtype)

    def fuse(self, x, weight, bias):
        return None if self.routed else super().fuse(x, weight, bias)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.routed:
            return super().embed(ids)
        B, A = self.all_factors()
        u = F.embedding(ids.reshape(-1), A.t()) * self.row_gate(ids.numel())
        return (u @ B.t()).reshape(*ids.shape, self.out_features)

    # -- bookkeeping -------------------------------------------------------------------------------------------------
    def spec(self) -> dict:
        return {**super().spec(), "n_learngenes": self.n_learngenes, "n_tailors": self.n_tailors,
                "n_groups": self.n_groups, "n_classes": self.n_classes, "r_anchor": self.r_anchor,
                "gate": self.gate, "frozen_learngenes": self.frozen_learngenes,
                **({"select": self._select} if self._select is not None else {})}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {name: getattr(self, name).detach() for part in PARTS.values() for name in part}
        out["groups"] = self.groups.detach()
        if self.logits is not None:
            out["logits"] = self.logits.detach()
        return out

    @classmethod
    def from_spec(cls, spec: dict, tensors: dict[str, torch.Tensor]) -> "KindDelta":
        out_f, in_f = int(spec["out_features"]), int(spec["in_features"])
        G, T, nG, r0 = (int(spec[k]) for k in ("n_learngenes", "n_tailors", "n_groups", "r_anchor"))
        C, gate = int(spec["n_classes"]), spec.get("gate", "hard")
        want = {"U_L": (out_f, G), "sigma_L": (G,), "Vh_L": (G, in_f), "U_T": (out_f, nG * T), "sigma_T": (nG * T,),
                "Vh_T": (nG * T, in_f), "U0": (out_f, r0), "sigma0": (r0,), "Vh0": (r0, in_f), "groups": (C,)}
        if gate == "soft":
            want["logits"] = (C, nG)
        for name, shape in want.items():
            if name not in tensors:
                raise ValueError(f"KIND tensors lack {name!r} (have {sorted(tensors)})")
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"KIND tensor {name} has shape {tuple(tensors[name].shape)}, but the spec "
                                 f"(G={G}, T={T}, groups={nG}, anchor={r0}, in={in_f}, out={out_f}) says {shape}")
        groups = tensors["groups"]
        if bool(((groups < -2) | (groups >= nG)).any()):
            raise ValueError(f"KIND class->group table has entries outside -2..{nG - 1}")
        d = cls(out_f, in_f, G, T, nG, groups, r0, gate, bool(spec.get("frozen_learngenes", False)),
                dropout=spec.get("dropout", 0.0), dtype=tensors["Vh_T"].dtype)
        with torch.no_grad():
            for name in want:
                if name != "groups":
                    getattr(d, name).copy_(tensors[name])
        d.select(spec.get("select"))
        return d

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, learngenes={self.n_learngenes}{' (frozen)' if self.frozen_learngenes else ''}"
                f", tailors={self.n_groups}x{self.n_tailors}, classes={self.n_classes}, anchor={self.r_anchor}, "
                f"gate={self.gate}")
