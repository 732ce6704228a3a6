"""KIND: knowledge integration and diversion with class-gated SVD components (Xie et al., arXiv 2408.07337 v1,
"KIND: Knowledge Integration and Diversion in Diffusion Models"; ICML 2025, "... for Training Decomposable
Models").

Every adapted weight is trained as components ``W_c = sum_i u_i (sigma_i m_{c,i}) v_i^T``: ``G`` always-on
*learngenes* (class-agnostic knowledge) and class-specific *tailors* switched on per sample by the class gate
``m_c`` (:mod:`deltatune.deltas.kind` has the formulas and the anchor that keeps ``W`` untouched). The class comes
from the batch: the model argument named by ``condition`` (``class_labels`` for diffusers' class-conditional
models, so ``unet(x, t, class_labels=y)`` gates every sample by its own ``y``), or ``model(..., condition=ids)``
(e.g. a task id for a multi-task text model).

The paper's full text and code are not available (ALGORITHMS.md section 6); what it leaves open is configurable,
and the defaults are these choices:

- ``init="svd"``: the components are the top singular triplets of the weight, in descending ``sigma``: the first
  ``G`` become learngenes, the next ``n_groups T`` tailors, dealt to the groups in turn (component ``G + j`` goes to
  group ``j mod n_groups``) so that every class starts with tailors of about the same energy. On a pretrained
  weight this is KIND v1 as a fine-tuning method; on a freshly initialized model it builds the *decomposable
  model* of the ICML version (the SVD of the random init, as the authors' DivMorph does). ``n_learngenes=None``
  takes every singular component that is not a tailor, so the components are the whole weight.
  ``init="zeros"``: new components in random orthonormal directions with ``sigma = 0`` are added to the weight
  (identity at init, like LoRA), for when the weight should stay as it is.
- ``gate="hard"``: the class's own tailor block on, the others off (the most likely reading of the paper);
  ``"soft"``: trainable per-class logits weigh the tailor blocks by their softmax (the successors DivControl and
  DivMorph; logits start at ``soft_init`` on the class's own group, 0 elsewhere).
- ``n_groups`` tailor groups (default: one per class) and ``class_groups`` (class -> group, default ``c -> c``;
  ``-1`` = learngenes only); ``null_class``: a class id gated to the learngenes alone (DiT's classifier-free-guidance
  null label), so set ``n_classes`` to include it.

Downstream (:mod:`deltatune.learngenes`): ``dt.kind_transfer`` keeps the learngenes (frozen or trainable) and makes
fresh tailors for new classes; ``dt.kind_recombine`` keeps the tailors of some classes only (fewer components, a
smaller model); ``dt.kind_select`` fixes one gate so that the adapter merges, exports (the learngene part as a PEFT
LoRA) and combines like any fixed update.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from ..deltas.kind import GATES, LEARNGENES, KindDelta, orthonormal
from .base import Method, adapter_dtype, check_dropout
from .lora import svd_triplets

INITS = ("svd", "zeros")


def class_groups(n_classes: int, n_groups: int, table: list[int] | None, null_class: int | None) -> torch.Tensor:
    """The class -> tailor-group table (n_classes,): ``table`` or ``c -> c``; ``null_class`` -> -1."""
    if table is None:
        if n_classes - (null_class is not None) > n_groups:
            raise ValueError(f"KIND has {n_groups} tailor groups for {n_classes} classes: give class_groups= (which "
                             "group each class uses) or n_groups >= the number of classes")
        groups = torch.arange(n_classes)
        if null_class is not None:
            groups[null_class + 1:] -= 1
    else:
        groups = torch.tensor(list(table), dtype=torch.long)
        if groups.shape != (n_classes,) or bool(((groups < -2) | (groups >= n_groups)).any()):
            raise ValueError(f"class_groups must list one group in -1..{n_groups - 1} per class ({n_classes} "
                             f"classes; -1: learngenes only, -2: removed), got {table!r}")
    if null_class is not None:
        groups[null_class] = -1
    return groups


def deal(n_learngenes: int, n_groups: int, T: int) -> torch.Tensor:
    """Component order for the tailors: tailor block ``k`` takes components ``G + k + j n_groups`` (j < T), so the
    blocks get singular values of about the same size."""
    j = torch.arange(T)
    return torch.cat([n_learngenes + k + j * n_groups for k in range(n_groups)])


def svd_components(W: torch.Tensor, G: int, n_groups: int, T: int):
    """``(learngenes, tailors)``, each ``(U, sigma, Vh)``, from the top ``G + n_groups T`` singular triplets of
    ``W`` (fp32 SVD); the tailors dealt to the groups by :func:`deal`."""
    U, S, Vh = svd_triplets(W, G + n_groups * T)
    order = deal(G, n_groups, T)
    return (U[:, :G], S[:G], Vh[:G]), (U[:, order], S[order], Vh[order])


@dataclass
class KIND(Method):
    """Class-gated SVD components: ``G`` learngenes always on, ``n_tailors`` per class group gated by the batch's
    class (see the module docstring for every choice and its default)."""

    name = "kind"

    n_classes: int = 0
    n_tailors: int = 4
    n_learngenes: int | None = None
    n_groups: int | None = None
    class_groups: list[int] | None = None
    null_class: int | None = None
    init: str = "svd"
    gate: str = "hard"
    soft_init: float = 4.0
    condition: str = "class_labels"
    dropout: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        if not isinstance(self.n_classes, int) or self.n_classes < 1:
            raise ValueError(f"KIND needs n_classes >= 1 (the size of its tailor table), got {self.n_classes!r}")
        if self.n_tailors < 1:
            raise ValueError(f"n_tailors must be >= 1 (components per class group), got {self.n_tailors}")
        if self.n_learngenes is not None and self.n_learngenes < 0:
            raise ValueError(f"n_learngenes must be >= 0 or None (every component that is not a tailor), got "
                             f"{self.n_learngenes}")
        if self.n_groups is not None and self.n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {self.n_groups}")
        if self.null_class is not None and not 0 <= self.null_class < self.n_classes:
            raise ValueError(f"null_class {self.null_class} must be a class id in 0..{self.n_classes - 1}")
        if self.init not in INITS:
            raise ValueError(f"unknown KIND init {self.init!r}; choose one of {INITS}")
        if self.gate not in GATES:
            raise ValueError(f"unknown KIND gate {self.gate!r}; choose one of {GATES}")
        if not isinstance(self.condition, str) or not self.condition:
            raise ValueError("condition must name the model argument that carries each sample's class")
        check_dropout(self.dropout)
        self.groups_table()

    @property
    def groups(self) -> int:
        return self.n_groups or self.n_classes - (self.null_class is not None)

    def groups_table(self) -> torch.Tensor:
        return class_groups(self.n_classes, self.groups, self.class_groups, self.null_class)

    # -- the condition protocol (deltatune.conditioning) ----------------------------------------------------------
    def condition_key(self) -> str:
        """The model argument that carries each sample's class."""
        return self.condition

    def build(self, module_name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> KindDelta:
        out_f, in_f = weight.shape
        nG, T, rank = self.groups, self.n_tailors, min(out_f, in_f)
        tail = nG * T
        G = self.n_learngenes if self.n_learngenes is not None else rank - tail
        if self.init == "svd" and (G < 0 or G + tail > rank):
            raise ValueError(f"{module_name}: a {out_f} x {in_f} weight has {rank} singular components, but KIND asks "
                             f"for {max(G, 0)} learngenes + {nG} groups x {T} tailors = {max(G, 0) + tail}; lower "
                             "n_tailors / n_learngenes, or exclude the layer")
        dtype = adapter_dtype(weight)
        d = KindDelta(out_f, in_f, G, T, nG, self.groups_table(), r_anchor=G + tail if self.init == "svd" else 0,
                      gate=self.gate, dropout=self.dropout, dtype=dtype, device=weight.device)
        with torch.no_grad():
            if self.init == "svd":
                (UL, SL, VL), (UT, ST, VT) = svd_components(weight, G, nG, T)
                d.U0.copy_(torch.cat([UL, UT], 1)), d.sigma0.copy_(torch.cat([SL, ST])), d.Vh0.copy_(torch.cat([VL, VT]))
            else:
                gen = torch.Generator().manual_seed(self.seed + zlib_hash(module_name))
                U, V = orthonormal(out_f, G + tail, gen), orthonormal(in_f, G + tail, gen)
                (UL, UT), (VL, VT) = U.split([G, tail], 1), V.t().split([G, tail], 0)
                SL, ST = torch.zeros(G), torch.zeros(tail)
            for name, t in (("U_L", UL), ("sigma_L", SL), ("Vh_L", VL), ("U_T", UT), ("sigma_T", ST), ("Vh_T", VT)):
                getattr(d, name).copy_(t)
            if d.logits is not None:
                d.logits.copy_(soft_logits(d.groups, nG, self.soft_init))
        return d


def soft_logits(groups: torch.Tensor, n_groups: int, own: float) -> torch.Tensor:
    """Initial soft-gate logits: ``own`` on each class's group, 0 elsewhere (all 0 for a learngene-only class)."""
    out = torch.zeros(groups.shape[0], n_groups)
    has = groups >= 0
    out[has.nonzero().squeeze(1), groups[has]] = own
    return out


def zlib_hash(text: str) -> int:
    """A stable per-layer seed offset (Python's ``hash`` of a string changes between runs)."""
    return zlib.crc32(text.encode()) % (2 ** 31)


# -- downstream: pure operations on one delta ---------------------------------------------------------------------
@torch.no_grad()
def transferred(d: KindDelta, groups: torch.Tensor, n_groups: int, n_tailors: int, frozen: bool,
                generator: torch.Generator, sigma: float = 0.0, gate: str | None = None,
                soft_init: float = 4.0) -> KindDelta:
    """A new delta with ``d``'s learngenes and anchor copied exactly (as buffers when ``frozen``) and fresh tailors:
    ``n_groups`` blocks of ``n_tailors`` components in random orthonormal directions orthogonal to the learngenes,
    with ``sigma`` (default 0: the new model starts as the learngene-only one), for classes mapped by ``groups``."""
    gate = gate or d.gate
    new = KindDelta(d.out_features, d.in_features, d.n_learngenes, n_tailors, n_groups, groups, d.r_anchor, gate,
                    frozen, dropout=d.dropout_p, dtype=d.dtype, device=d.Vh_T.device)
    R = n_groups * n_tailors
    for name in ("U_L", "sigma_L", "Vh_L", "U0", "sigma0", "Vh0"):
        getattr(new, name).copy_(getattr(d, name))
    new.U_T.copy_(orthonormal(d.out_features, R, generator, against=d.U_L.detach().cpu()))
    new.Vh_T.copy_(orthonormal(d.in_features, R, generator, against=d.Vh_L.detach().t().cpu()).t())
    new.sigma_T.fill_(float(sigma))
    if new.logits is not None:
        new.logits.copy_(soft_logits(new.groups, n_groups, soft_init))
    return new


@torch.no_grad()
def recombined(d: KindDelta, keep_groups: list[int]) -> KindDelta:
    """A smaller delta: the learngenes and the tailor blocks ``keep_groups`` only (renumbered in that order);
    classes whose group is dropped are marked removed (-2) and refused afterwards."""
    T, nG = d.n_tailors, len(keep_groups)
    remap = torch.full((d.n_groups,), -2, dtype=torch.long)
    remap[torch.tensor(keep_groups, dtype=torch.long)] = torch.arange(nG)
    groups = torch.where(d.groups < 0, d.groups, remap.to(d.groups.device)[d.groups.clamp_min(0)])
    new = KindDelta(d.out_features, d.in_features, d.n_learngenes, T, nG, groups, d.r_anchor, d.gate,
                    d.frozen_learngenes, dropout=d.dropout_p, dtype=d.dtype, device=d.Vh_T.device)
    cols = torch.cat([torch.arange(k * T, (k + 1) * T) for k in keep_groups]).to(d.Vh_T.device)
    for name in ("U_L", "sigma_L", "Vh_L", "U0", "sigma0", "Vh0"):
        getattr(new, name).copy_(getattr(d, name))
    new.U_T.copy_(d.U_T[:, cols]), new.sigma_T.copy_(d.sigma_T[cols]), new.Vh_T.copy_(d.Vh_T[cols])
    if new.logits is not None:
        new.logits.copy_(d.logits[:, torch.tensor(keep_groups, device=d.logits.device)])
    return new


__all__ = ["KIND", "LEARNGENES", "class_groups", "deal", "recombined", "svd_components", "transferred"]
