"""The delta protocol shared by every structure.

A delta is a small ``nn.Module`` that represents an update ``dW`` of one frozen weight ``W`` (always in the
*linear layout*, ``out x in``, whatever the wrapped layer stores) and knows how to

- add its effect to the base output without materializing ``dW`` (:meth:`Delta.forward`, :meth:`Delta.add_to`,
  :meth:`Delta.embed` for lookup tables);
- materialize ``dW`` (:meth:`Delta.dense`) and, where it has one, a bias update (:meth:`Delta.dense_bias`);
- describe itself as JSON (:meth:`Delta.spec`) plus a flat tensor dict (:meth:`Delta.tensors`), and be rebuilt
  from that pair (:func:`delta_from_spec`); a spec for tensors made elsewhere (an import, an extraction) comes from
  the structure's own :meth:`Delta.spec_for`;
- say how it is written as PEFT LoRA tensors (:meth:`Delta.peft_export`: exactly, as a module kept whole, or by
  truncated SVD of :meth:`Delta.dense`) and, for structures a PEFT checkpoint holds, how it is read back
  (``from_peft``, e.g. :meth:`deltatune.deltas.LowRankDelta.from_peft`).

Generic code (injection, merging, saving, export) only ever talks to this interface.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import finite_number, finite_tensor, is_number, positive_int
from ..svd import svd_factors

_STRUCTURES: dict[str, type["Delta"]] = {}


class NotLowRank(ValueError):
    """A delta that is not a LoRA was to be written as one without a rank or an energy for its truncated SVD."""


class Unbound(RuntimeError):
    """A delta whose update depends on the base weight was used before :meth:`Delta.bind` gave it that weight."""


@dataclass
class PeftTensors:
    """What one module writes into a PEFT LoRA checkpoint (:meth:`Delta.peft_export`): a LoRA
    ``dW = scale * B @ A`` (``B`` out x r, ``A`` r x in, linear layout; ``error`` the relative Frobenius error when
    it is a truncated SVD), or, with ``saved``, the module's own parameters (PEFT's ``modules_to_save``: ``weight``
    in linear layout and ``bias``). ``extra``: further tensors of the module under PEFT's names (key suffix ->
    tensor, e.g. a DoRA magnitude vector), written as they are."""

    B: torch.Tensor | None = None
    A: torch.Tensor | None = None
    scale: float = 1.0
    error: float | None = None
    saved: dict[str, torch.Tensor] | None = None
    extra: dict[str, torch.Tensor] | None = None


class Delta(nn.Module):
    """Base class: an update ``dW`` (out x in) of one weight, applied additively: ``y = W x + b + dW x``."""

    structure: ClassVar[str] = ""
    #: True for structures that compute the layer's whole output themselves (:meth:`replace`) instead of adding
    #: to the base output; the layer then skips the base computation.
    replaces_output: ClassVar[bool] = False
    #: True when the update acts on the layer's *current* weight (a rotation: ``W <- W R^T``) instead of adding a
    #: fixed ``dW``: merging another delta underneath a live one would change the layer's output, so the layer
    #: refuses; such deltas merge first, and unmerging restores their copies instead of inverting them.
    acts_on_weight: ClassVar[bool] = False
    #: True when :meth:`dense` needs the base weight (a checkpoint alone cannot say what the update is).
    needs_base: ClassVar[bool] = False
    #: True when the delta is a module's own trained parameters (PEFT's ``modules_to_save``): combinations keep it a
    #: whole module (weights and bias), never a low-rank re-factorization.
    whole_module: ClassVar[bool] = False

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.out_features = int(out_features)
        self.in_features = int(in_features)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.structure:
            _STRUCTURES[cls.structure] = cls

    # -- application -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Contribution ``dW x`` for a dense input ``x`` (..., in)."""
        return F.linear(x.to(self.dense().dtype), self.dense())

    def add_to(self, out: torch.Tensor, x: torch.Tensor, inplace: bool = True) -> torch.Tensor:
        """``out + dW x``; structures override this to fuse the addition into their last kernel, writing into
        ``out`` when ``inplace`` (the caller then never uses ``out`` again) and it owns its storage."""
        return out + self(x).to(out.dtype)

    def fuse(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The whole output ``x (W + dW)^T + b`` of a plain linear layer, for 2-D ``x``, when this delta is the only
        one live on it: a structure may compute it as one fused autograd node. ``None`` (the default) means "no
        fused kernel": the layer then calls its base and :meth:`add_to`."""
        return None

    def replace(self, x: torch.Tensor, embedding: bool = False) -> torch.Tensor:
        """The layer's full output ``(W + dW) x + b + db`` (only for ``replaces_output`` structures)."""
        raise NotImplementedError

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Contribution for a lookup table: row ``ids`` of ``dW^T`` (the one-hot input of a linear map)."""
        return F.embedding(ids, self.dense().t())

    def bind(self, layer) -> None:
        """Called when the delta is installed on ``layer``: anything whose ``linear_weight()`` and ``base_bias()``
        give the frozen weight (out x in) and bias *as they are now* (the model's layer wrapper, or a
        :class:`FrozenWeight`), and which may say ``is_merged(delta)`` (whether ``delta`` is merged into that
        weight; a source without it merges nothing). The delta keeps ``layer`` as an unregistered reference, read
        through :meth:`base_weight` / :meth:`is_merged`; structures that need more at bind time extend this."""
        self.__dict__["_source"] = layer

    def base_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W, b)``: the current weight (linear layout) and bias of what the delta is bound to; :class:`Unbound`
        before :meth:`bind`."""
        source = self.__dict__.get("_source")
        if source is None:
            raise Unbound(f"a {self.structure!r} delta needs the weight it acts on; install it on a layer first")
        return source.linear_weight(), source.base_bias()

    def is_merged(self) -> bool:
        """Whether the weight this delta is bound to has it merged in (per the bound source's ``is_merged``)."""
        check = getattr(self.__dict__.get("_source"), "is_merged", None)  # optional part of the bind protocol
        return bool(check(self)) if check is not None else False

    # -- materialization -----------------------------------------------------------------------------------
    def live_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(B, A, s)`` with gradients when ``dW = s B A`` (``B`` out x r, ``A`` r x in), for layer kinds that apply
        the update as two products of their own (a convolution as LoCon: ``A`` a conv, ``B`` a 1x1 conv), with
        :meth:`drop` applied to the input first; ``None`` (default): they apply :meth:`dense`."""
        return None

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """The input transform applied before this delta's product (input dropout; identity by default)."""
        return x

    #: True while the update differs per row of the batch (class-gated components, :mod:`deltatune.deltas.kind`):
    #: ``dW_i = s B diag(row_gate_i) A`` with :meth:`live_factors` ``(B, A, s)``; layer kinds that apply the factors
    #: themselves multiply the rank-space activations by :meth:`row_gate` between them, and fused kernels step aside
    routed: ClassVar[bool] = False

    def row_gate(self, n: int) -> torch.Tensor:
        """The gate of each of ``n`` rows on the rank dimension (n x r), for :attr:`routed` deltas."""
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """The full update ``dW`` (out x in)."""
        raise NotImplementedError

    def lowrank(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(B, A, s)`` with ``dW = s * B @ A`` exactly, for structures that are a LoRA in disguise (exported to PEFT
        as is); ``None`` for the rest."""
        return None

    def dense_bias(self) -> torch.Tensor | None:
        """The bias update, or ``None`` when the structure leaves the bias alone (all but full replacement)."""
        return None

    @classmethod
    def weighted_sum(cls, terms: list[tuple["Delta", float]]) -> "Delta | None":
        """``sum_i w_i dW_i`` for deltas ``terms = [(delta_i, w_i)]`` of this structure, as one delta of this structure
        when that is exact (sparse deltas: on the union of their entries); ``None`` when the structure cannot hold
        the sum (the caller then concatenates low-rank factors or goes dense)."""
        return None

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: float = 1.0) -> None:
        """``W += scale * dW`` (and ``b += scale * db``) in place; half-precision weights accumulate in float32.
        ``scale`` is the merge weight (``-weight`` to unmerge). Multiplicative structures override this."""
        for target, update in ((weight, self.dense()), (bias, self.dense_bias())):
            if update is None or target is None:
                continue
            if target.dtype in (torch.float16, torch.bfloat16):
                target.copy_((target.float() + scale * update.float()).to(target.dtype))
            else:
                target.add_(update.to(target.dtype), alpha=scale)

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def spec(self) -> dict:
        """JSON-serializable description: enough, with :meth:`tensors`, to rebuild the delta."""
        return {"structure": self.structure, "out_features": self.out_features, "in_features": self.in_features}

    @classmethod
    def spec_for(cls, out_features: int, in_features: int, layer: str | None = None, **keys) -> dict:
        """The spec of a delta of this structure on a ``layer`` kind (``None``: unknown) of weight shape
        ``(out_features, in_features)``, for tensors made without building the delta; ``keys`` are the
        structure's own spec keys (structures name them in their override)."""
        return {"structure": cls.structure, "layer": layer, "out_features": int(out_features),
                "in_features": int(in_features), **keys}

    # -- PEFT LoRA checkpoints ----------------------------------------------------------------------------------
    @classmethod
    def peft_export(cls, spec: dict, tensors: dict[str, torch.Tensor], build: Callable[[], "Delta"],
                    rank: int | None = None, energy: float | None = None) -> PeftTensors:
        """How a delta of this structure (its ``spec`` and ``tensors``) is written as PEFT LoRA tensors; ``build()``
        gives the delta, bound to its base weight when it needs one. Default: the exact LoRA :meth:`lowrank`
        returns, else the truncated SVD ``dW ~ U_k diag(S_k) Vh_k`` of :meth:`dense` at ``rank`` (or the fewest
        components holding ``energy`` of ``||dW||_F^2``), ``B = U_k diag(S_k)``, ``A = Vh_k``, scale 1; neither
        given: :class:`NotLowRank`."""
        delta = build()
        factors = delta.lowrank()
        if factors is not None:
            return PeftTensors(*factors)
        if rank is None and energy is None:
            raise NotLowRank(f"a {cls.structure!r} delta is not a LoRA; give a rank or an energy to export it by "
                             "truncated SVD (dt.save(..., format='peft', rank=16) or deltatune export --rank 16 / "
                             "--energy 0.9)")
        B, A, err = svd_factors(delta.dense(), rank, energy)
        return PeftTensors(B, A, 1.0, error=err)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``{name: tensor}`` of everything needed to rebuild the delta."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    @classmethod
    def from_spec(cls, spec: dict, tensors: dict[str, torch.Tensor]) -> "Delta":
        raise NotImplementedError

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, in_features={self.in_features}"


class FrozenWeight:
    """What :meth:`Delta.bind` needs of a layer, for when only its base weight is known (exporting or combining a
    checkpoint whose update depends on the base, with the base read from the model's files): nothing is merged."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias

    def linear_weight(self) -> torch.Tensor:
        return self.weight

    def base_bias(self) -> torch.Tensor | None:
        return self.bias


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype a layer computes ``x W^T`` in, as ``F.linear`` would: the autocast dtype while autocast is on for
    ``x``'s device, else the dtype ``x`` and ``W`` share (``None`` when they differ: no fused node then)."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.dtype == weight.dtype else None


def fusable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None = None) -> bool:
    """Whether a delta may compute a layer's whole output as one autograd node (:meth:`Delta.fuse`): the weight and
    bias are frozen and the layer has a compute dtype (:func:`compute_dtype`; the delta's own dtype may differ: a
    float32 adapter on a bfloat16 base, or under autocast)."""
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    return frozen and compute_dtype(x, weight) is not None


def fused_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *params: torch.Tensor):
    """``(x, W, b, *params)`` in the layer's compute dtype for a fused node, or ``None`` when the layer is not
    :func:`fusable`. The casts are autograd ops outside the node: the node computes in the compute dtype (bfloat16
    under bf16 autocast, as ``F.linear`` would) while float32 master parameters get their gradients cast back to
    float32 (no cast, and no copy, where the dtypes already agree)."""
    if not fusable(x, weight, bias):
        return None
    c = compute_dtype(x, weight)
    return (x.to(c), weight.to(c), None if bias is None else bias.to(c), *(p.to(c) for p in params))


def structure_class(structure: str) -> type[Delta]:
    """The delta class registered for ``structure``."""
    if structure not in _STRUCTURES:
        raise ValueError(
            f"unknown delta structure {structure!r}; this deltatune knows {sorted(_STRUCTURES)}. "
            "Was the checkpoint written by a newer deltatune?"
        )
    return _STRUCTURES[structure]


#: spec keys that hold sizes or counts (non-negative integers; ``out_features`` / ``in_features`` positive)
SIZE_KEYS = ("out_features", "in_features", "r", "k", "block_size", "terms", "axis", "r_anchor")
NUMBER_KEYS = ("scale", "dropout")  # spec keys that must be (finite) numbers


def check_spec(spec) -> type[Delta]:
    """The structure class of ``spec``, after checking its scalars: a known ``structure``, positive integer
    ``out_features`` / ``in_features``, the other :data:`SIZE_KEYS` non-negative integers, the :data:`NUMBER_KEYS`
    numbers, every number finite
    (a ``scale`` of NaN would give finite, wrong outputs). ``ValueError`` naming the key."""
    if not isinstance(spec, dict):
        raise ValueError(f"a module's spec must be a JSON object, got {type(spec).__name__}")
    for key in ("structure", "out_features", "in_features"):
        if key not in spec:
            raise ValueError(f"the spec lacks key {key!r} (it has {sorted(spec)})")
    cls = structure_class(spec["structure"])
    try:
        for key, value in spec.items():
            if key in SIZE_KEYS:
                positive_int(value, f"spec key {key!r}", allow_zero=key not in ("out_features", "in_features"))
            elif is_number(value) or key in NUMBER_KEYS:
                finite_number(value, f"spec key {key!r}")
    except TypeError as e:
        raise ValueError(str(e)) from None
    return cls


def _check_rebuilt(d: Delta, spec: dict, tensors: dict[str, torch.Tensor]) -> None:
    """The rebuilt delta must be the one the spec and tensors describe: the same tensor names and shapes
    (:meth:`Delta.tensors`), the same values for the spec keys it reports (:meth:`Delta.spec`), and a bias update,
    if any, of shape ``(out_features,)``."""
    got = d.tensors()
    extra, missing = sorted(set(tensors) - set(got)), sorted(set(got) - set(tensors))
    if extra or missing:
        raise ValueError(f"a {d.structure!r} delta has tensors {sorted(got)}, the checkpoint has "
                         f"{sorted(tensors)}" + (f" (unexpected: {extra})" if extra else "")
                         + (f" (missing: {missing})" if missing else ""))
    for k, t in got.items():
        if tuple(t.shape) != tuple(tensors[k].shape):
            raise ValueError(f"tensor {k!r} has shape {tuple(tensors[k].shape)}, but the spec "
                             f"({_brief(spec)}) needs {tuple(t.shape)}")
    for k, v in d.spec().items():
        if k in spec and spec[k] != v and not (is_number(v) and is_number(spec[k])
                                               and math.isclose(v, spec[k], rel_tol=1e-6)):
            raise ValueError(f"spec key {k!r} is {spec[k]!r}, but the tensors make it {v!r}")
    db = d.dense_bias()
    if db is not None and tuple(db.shape) != (d.out_features,):
        raise ValueError(f"the bias has shape {tuple(db.shape)}, but the layer has {d.out_features} outputs: "
                         f"it needs ({d.out_features},)")


def _brief(spec: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in spec.items() if k in SIZE_KEYS)


def delta_from_spec(spec: dict, tensors: dict[str, torch.Tensor]) -> Delta:
    """Rebuild a delta of any registered structure from its :meth:`Delta.spec` and :meth:`Delta.tensors`.

    Checked for every structure alike (``ValueError`` naming the key or tensor): the spec's scalars
    (:func:`check_spec`), every floating tensor finite, and the rebuilt delta against what was given
    (:func:`_check_rebuilt`: names, shapes, spec values, bias shape)."""
    cls = check_spec(spec)
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError("a delta's tensors must be a {name: tensor} dict")
    for k, t in tensors.items():
        finite_tensor(t, f"tensor {k!r}")
    try:
        d = cls.from_spec(spec, tensors)
    except KeyError as e:
        raise ValueError(f"a {spec['structure']!r} delta needs {e.args[0]!r}, which is neither in its spec "
                         f"(keys {sorted(spec)}) nor among its tensors ({sorted(tensors)})") from None
    except (TypeError, RuntimeError) as e:  # e.g. a tensor of the wrong rank or dtype reaching a constructor
        raise ValueError(f"cannot rebuild a {spec['structure']!r} delta from its spec and tensors: {e}") from None
    _check_rebuilt(d, spec, tensors)
    return d


def structures() -> list[str]:
    return sorted(_STRUCTURES)
