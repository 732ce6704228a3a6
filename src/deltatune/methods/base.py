"""What every method shares: the config base class and the controller protocol.

A *method* = a delta structure + an initializer (:meth:`Method.build`) + optionally a *controller*
(:meth:`Method.controller`) that acts during training. Controllers have one protocol, called by the deltatune
trainer, by :class:`deltatune.train.DeltatuneCallback` for Hugging Face ``Trainer``, or by hand in a bare loop::

    dt.begin(model, total_steps)    # optional: tells schedules how long training runs, resets the step counter
    for batch in data:
        loss = ...; loss.backward()
        dt.after_backward(model, optimizer)  # gradients are present (clipped), before the update
        optimizer.step()
        dt.step(model, optimizer)   # required: importance, masking, pruning, growing; before zero_grad()
        optimizer.zero_grad()

Every built-in controller works with ``dt.step`` alone; regularizer gradients enter during ``backward`` through
gradient hooks, so they apply whatever the model returns.
"""
from __future__ import annotations

import dataclasses
import difflib
import numbers
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..checks import finite_number, is_number, positive_int
from ..deltas import Delta, FullDelta

_METHODS: dict[str, type["Method"]] = {}


@dataclass(frozen=True)
class StepInfo:
    """Where training stands, handed to every controller hook.

    ``step``: optimizer steps done so far (0 before the first); ``total_steps``: what ``dt.begin`` was told
    (``None``: unknown); ``optimizer``: in :meth:`Controller.after_step`, the optimizer passed to this ``dt.step``
    call (``None`` when none was: a step that must resize then refuses); in the other hooks, the one passed to this
    call or else the last one passed to ``dt.step`` / ``dt.after_backward``; ``resizable=False``: parameters must
    keep their shapes (mask instead of remove, e.g. under a DDP wrapper that cannot be rebuilt)."""

    step: int
    total_steps: int | None
    optimizer: torch.optim.Optimizer | None
    resizable: bool = True

    @property
    def resumed(self) -> bool:
        """Whether training continues from a later step: controllers then keep the state
        :meth:`Controller.load_state_dict` restored instead of starting afresh in :meth:`Controller.begin`."""
        return self.step > 0


class Controller:
    """Acts on one adapter during training. Every hook is optional; the default does nothing. A controller gets its
    adapter's deltas when :meth:`Method.controller` builds it and keeps them; each hook receives a
    :class:`StepInfo`.

    State: :meth:`state_dict` returns everything a resumed run needs to make the same decisions (EMAs, masks,
    schedule progress) as a nested dict of JSON values and tensors, keyed by module name where it is per layer;
    ``dt.save`` stores it with the adapter (tensors in the adapter's safetensors file under ``@controller/``, the
    rest in ``adapter_config.json``) and ``dt.load`` hands it to :meth:`load_state_dict` of the new adapter's
    controller. :meth:`begin` at step 0 starts afresh; at a later step (``info.resumed``) it keeps the loaded
    state."""

    def begin(self, info: StepInfo) -> None:
        """Called once before training: ``info.total_steps`` optimizer steps will follow, from ``info.step``."""

    def after_backward(self, info: StepInfo) -> None:
        """Called after ``loss.backward()`` and before ``optimizer.step()``; gradients are present."""

    def after_step(self, info: StepInfo) -> bool:
        """Called after ``optimizer.step()`` and before ``zero_grad()`` of step ``info.step``; may change parameters,
        their shapes and the optimizer's state. Returns True when a parameter changed shape (a DDP wrapper must
        then be rebuilt)."""
        return False

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging (e.g. current budget and total rank)."""
        return {}

    def state_dict(self) -> dict:
        """The controller's running state: JSON values and tensors in nested dicts (no other objects)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output onto this controller's (freshly loaded) adapter; raise ``ValueError``
        naming the module when it does not fit."""


#: PEFT's names for fields that mean the same here: ``dt.LoRA(lora_alpha=16, target_modules=["query"])`` works
ALIASES = {
    "lora_alpha": "alpha", "target_modules": "targets", "exclude_modules": "exclude", "lora_dropout": "dropout",
    "layers_to_transform": "layers", "tinit": "t_init", "tfinal": "t_final", "deltaT": "delta_t",
}
#: PEFT arguments with no same-named field here, and what to use instead
HINTS = {
    "init_lora_weights": "use init= ('kaiming', 'gaussian', 'pissa', 'milora', 'olora', 'corda_ipa', 'eva'; "
                         "niter=K for PEFT's 'pissa_niter_K')",
    "task_type": "deltatune needs no task type: list a new head in modules_to_save",
    "fan_in_fan_out": "deltatune detects GPT-2's Conv1D layout by itself",
    "layers_pattern": "layers= counts the last numbered module-name component (deltatune.targets.layer_index)",
    "bias": "deltatune does not train biases of adapted layers; put a module in modules_to_save to train it whole",
    "use_dora": "DoRA is not implemented in deltatune",
    "inference_mode": "freeze with dt.load(..., is_trainable=False)",
    # the options of data-aware initializers live on their own methods
    "eva_rho": "EVA's options are fields of dt.EVA(...) (init='eva' with its defaults otherwise)",
    "eva_tau": "EVA's options are fields of dt.EVA(...) (init='eva' with its defaults otherwise)",
    "calibration": "CorDA's options are fields of dt.CorDA(...) (init='corda_ipa'/'corda_kpa' with its defaults "
                   "otherwise)",
    "max_batches": "calibration options are fields of dt.CorDA(...) and dt.EVA(...)",
}


def _method_kwargs(cls: type, kwargs: dict) -> dict:
    """``kwargs`` with PEFT's names (:data:`ALIASES`) renamed to this method's fields; an unknown name raises
    ``TypeError`` with the closest field (``did you mean alpha=?``) or a :data:`HINTS` entry."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    out = {}
    for key, value in kwargs.items():
        field_name = ALIASES.get(key, key) if key not in fields else key
        if field_name not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1, cutoff=0.6)
            hint = HINTS.get(key) or (f"did you mean {close[0]}=?" if close else
                                      f"its fields are: {', '.join(sorted(fields))}")
            raise TypeError(f"{cls.__name__}() got an unexpected argument {key!r}; {hint}")
        if field_name in out:
            raise TypeError(f"{cls.__name__}() got {field_name!r} twice (as {field_name!r} and as PEFT's "
                            f"{next(k for k, v in ALIASES.items() if v == field_name)!r}); give one")
        out[field_name] = value
    return out


class _MethodType(type):
    """Renames PEFT's argument names before the dataclass ``__init__`` runs (one mechanism for every method)."""

    def __call__(cls, *args, **kwargs):
        return super().__call__(*args, **_method_kwargs(cls, kwargs))


@dataclass
class Method(metaclass=_MethodType):
    """Base config. ``targets``/``exclude``: see :mod:`deltatune.targets`; ``modules_to_save``: modules (e.g. a
    new classification head) that train in full and are saved with the adapter; ``layers``: only targets in these
    layer indices (PEFT's ``layers_to_transform``; see :func:`deltatune.targets.layer_index`).

    Every method also takes PEFT's names where they mean the same (:data:`ALIASES`: ``lora_alpha``,
    ``target_modules``, ``exclude_modules``, ``lora_dropout``, ``layers_to_transform``, AdaLoRA's ``tinit``, ...);
    unknown names raise ``TypeError`` with the closest field."""

    name: ClassVar[str] = ""

    targets: Any = "all-linear"
    exclude: Any = None
    modules_to_save: list[str] | None = None
    layers: list[int] | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name and "name" in cls.__dict__:  # a subclass that keeps its parent's name does not replace it
            _METHODS[cls.name] = cls

    def build(self, module_name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Delta:
        """The delta for one layer whose weight is ``weight`` (out x in, linear layout)."""
        raise NotImplementedError

    def build_all(self, model: nn.Module, layers: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
                  data=None) -> dict[str, Delta]:
        """The deltas for all target layers ``{module name: (weight, bias)}`` at once (a layer may be left out).
        The default builds each layer on its own with :meth:`build`; methods that decide across layers (which heads
        of which block, how many entries each matrix gets) override this. ``model`` is the model being adapted
        (see :func:`deltatune.layers.base_modules` for its layers without adapter wrappers); ``data``: the
        calibration batches given to ``dt.attach`` (``None`` when there are none)."""
        return {name: self.build(name, w, b) for name, (w, b) in layers.items()}

    def controller(self, deltas: dict[str, Delta], model: nn.Module) -> Controller | None:
        """The controller that acts on this adapter during training (``None``: it needs none). ``deltas``:
        ``{module name: delta}`` of this adapter as installed on the model (its ``modules_to_save`` entries
        included), which the controller keeps; ``model``: the model without wrappers, for read-only needs such as
        :func:`deltatune.layers.base_parameter_count`."""
        return None

    def validate(self) -> None:
        """Raise ``ValueError`` on bad hyperparameters before anything touches the model."""

    def condition_key(self) -> str | None:
        """The model argument whose per-sample values gate this adapter's deltas (KIND: the class labels), read on
        every call by :mod:`deltatune.conditioning`; ``None`` (default): the deltas take no condition."""
        return None

    # -- PEFT's adapter_config.json (deltatune.io.peft_format loops over these) -----------------------------
    #: the PEFT ``peft_type`` whose checkpoints this method reads (``None``: none); such a method also sets
    #: ``peft_structure`` (the delta structure that reads the tensors, with its ``from_peft``), ``peft_keys``
    #: ({config key: check}, see :func:`deltatune.methods.peft.check_config`) and defines :meth:`peft_rank`,
    #: :meth:`peft_scale` and :meth:`from_peft_config`
    peft_type: ClassVar[str | None] = None
    peft_structure: ClassVar[str | None] = None
    peft_keys: ClassVar[dict | None] = None
    #: config keys a checkpoint of this method must have (checked before its tensors are read)
    peft_required: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def reads_peft(cls, config: dict) -> bool:
        """Whether this method reads the PEFT checkpoint whose config is ``config`` (of its :attr:`peft_type`); a
        later-registered method that claims the same type (a LoRA variant) refines this."""
        return cls.peft_type is not None and config.get("peft_type") == cls.peft_type

    def peft_lora(self) -> dict:
        """This config's keys of a PEFT LoRA ``adapter_config.json`` when its deltas are written as LoRA factors
        (exactly or by SVD): ``use_rslora`` (how ``lora_alpha`` relates to the scale) and ``lora_dropout``.
        Default: a plain LoRA, with this method's ``dropout`` if it has one."""
        return {"lora_dropout": float(getattr(self, "dropout", 0.0) or 0.0), "use_rslora": False}

    # -- serialization -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(d: dict) -> "Method":
        d = dict(d)
        name = d.pop("method", None)
        if name not in _METHODS:
            raise ValueError(f"unknown method {name!r}; known methods: {sorted(_METHODS)}")
        cls = _METHODS[name]
        known = {f.name for f in dataclasses.fields(cls)}
        d = {ALIASES.get(k, k) if k not in known else k: v for k, v in d.items()}
        return cls(**{k: v for k, v in d.items() if k in known})


#: fields that, when set, must be a positive integer / a non-zero number (one table for every method)
POSITIVE_FIELDS = ("r", "init_r", "target_r", "block_size", "terms", "add_r", "top_h", "delta_t")
NONZERO_FIELDS = ("alpha", "alpha_pattern")


def _accepts(hint, value) -> bool | None:
    """Whether ``value`` fits the annotation ``hint`` (``None``: the annotation is not one this check reads)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        verdicts = [_accepts(a, value) for a in args]
        return True if any(verdicts) else (None if None in verdicts else False)
    base = typing.get_origin(hint) or hint
    if base is type(None):
        return value is None
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if base is float:
        return is_number(value)
    if base is str:
        return isinstance(value, (str, os.PathLike))  # file names may come as paths
    if base in (list, tuple):
        return isinstance(value, (list, tuple))
    if base is dict:
        return isinstance(value, dict)
    return None


def _numbers(value):
    """Every number inside ``value`` (through dicts, lists, tuples)."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers(v)
    elif is_number(value):
        yield value


def check_fields(method: "Method") -> None:
    """Type and value checks of a method config driven by its dataclass annotations, for every method at once:
    each field must have its annotated type (``bool`` is not an ``int``; an ``int`` is a ``float``), every number
    in it (also inside dicts and lists) must be finite, the :data:`POSITIVE_FIELDS` positive and the
    :data:`NONZERO_FIELDS` non-zero. ``TypeError`` / ``ValueError`` naming ``Method.field`` and the value given."""
    cls = type(method)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(method):
        value, what = getattr(method, f.name), f"{cls.__name__}.{f.name}"
        if _accepts(hints.get(f.name, Any), value) is False:
            raise TypeError(f"{what} must be {_describe(hints[f.name])}, got {value!r} ({type(value).__name__})")
        for x in _numbers(value):
            finite_number(x, what, nonzero=f.name in NONZERO_FIELDS)
        if f.name in POSITIVE_FIELDS and value is not None:
            positive_int(value, what)


def _describe(hint) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    names = " or ".join(getattr(typing.get_origin(a) or a, "__name__", str(a)) for a in args)
    return names + (" or None" if type(None) in typing.get_args(hint) else "")


def full_replacement(weight: torch.Tensor, bias: torch.Tensor | None) -> Delta:
    """The delta for a ``modules_to_save`` entry."""
    return FullDelta(weight, bias)


def methods() -> list[str]:
    return sorted(_METHODS)


def method_classes() -> list[type[Method]]:
    """The registered method classes, in registration order."""
    return list(_METHODS.values())


def check_dropout(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters on half-precision weights train in float32 (as PEFT's ``autocast_adapter_dtype``)."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


__all__ = ["Controller", "Method", "StepInfo", "adapter_dtype", "check_dropout", "check_fields", "field",
           "full_replacement", "method_classes", "methods"]
