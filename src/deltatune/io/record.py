"""An adapter in memory, independent of any model or file format.

``AdapterRecord`` is what every format reads into and writes from: the method config, and per adapted module
its layer kind, the layer's geometry where file formats need it (:attr:`~deltatune.layers.LayerKind.geometry`:
a conv's ``kernel`` and ``groups``), the delta's spec (:meth:`Delta.spec`) and tensors (:meth:`Delta.tensors`),
all in the linear layout (``out x in``).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import control as C
from .. import model as M
from ..layers import kind_of, linear_weight, unwrap
from ..registry import adapted_layers
from ..sharding import full
from ..deltas import Delta, delta_from_spec
from ..deltas.base import check_spec
from ..methods.base import Method, check_fields

FORMAT_VERSION = 2  # what this version reads; 2 adds controller state, and a save without it still writes 1
PLAIN_FORMAT_VERSION = 1  # an adapter without controller state: readable by every deltatune


@dataclass
class AdapterRecord:
    name: str
    method: dict
    modules: dict[str, dict]  # module name -> {"layer": kind, **layer geometry, **delta spec}
    tensors: dict[str, dict[str, torch.Tensor]]  # module name -> delta tensors
    base_model: str | None = None
    task_type: str | None = None
    extra: dict = field(default_factory=dict)
    #: training state saved with the adapter: ``{"step": the model's step counter, "state": the controller's
    #: state_dict() (JSON values and tensors) or None}``; ``None``: not saved
    controller: dict | None = None

    def num_parameters(self) -> int:
        """Trained values (integer tensors such as sparse indices are not parameters)."""
        return sum(t.numel() for ts in self.tensors.values() for t in ts.values() if t.is_floating_point())


def task_type_of(model: nn.Module) -> str | None:
    cls = type(unwrap(model)).__name__
    for suffix, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
                         ("ForSeq2SeqLM", "SEQ_2_SEQ_LM")):
        if cls.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION" if hasattr(getattr(model, "config", None), "model_type") else None  # transformers



def record_from_model(model: nn.Module, name: str, controller_state: bool = True) -> AdapterRecord:
    model = unwrap(model)
    modules, tensors = {}, {}
    for mod_name, layer in adapted_layers(model):
        if name in layer.deltas:
            delta = layer.deltas[name]
            modules[mod_name] = {"layer": layer.kind, **layer.layer_kind.geometry(layer.base), **delta.spec()}
            tensors[mod_name] = full(delta.tensors())  # FSDP2: gathered on every rank (a collective)
    config = getattr(model, "config", None)
    return AdapterRecord(name, M.method_of(model, name).to_dict(), modules, tensors,
                         base_model=getattr(config, "_name_or_path", None) or None, task_type=task_type_of(model),
                         controller=full(C.saved_state(model, name)) if controller_state else None)


def check_fits(model: nn.Module, record: AdapterRecord) -> dict[str, nn.Module]:
    """``{module name: base module}`` for every module of the record; raise on the first one that does not fit."""
    bases = dict(M.base_modules(model))
    found = {}
    for mod_name, spec in record.modules.items():
        base = bases.get(mod_name)
        if base is None:
            close = difflib.get_close_matches(mod_name, list(bases), n=3, cutoff=0.5)
            raise ValueError(
                f"adapter {record.name!r} does not fit this model: it has a delta for {mod_name!r}, which the model "
                f"lacks (close names: {close or 'none'}). Was it trained on another base model "
                f"({record.base_model or 'unknown'})?"
            )
        try:
            kind = kind_of(base).name
        except TypeError:
            raise ValueError(f"adapter {record.name!r} does not fit this model: {mod_name!r} is a "
                             f"{type(base).__name__}, which deltatune cannot adapt") from None
        geometry = kind_of(base).geometry(base)
        differs = sorted(k for k in geometry if k in spec and spec[k] != geometry[k])
        if differs:
            raise ValueError(
                f"adapter {record.name!r} does not fit this model: {mod_name!r} is a {kind} with "
                + ", ".join(f"{k} {geometry[k]}" for k in differs) + ", but the adapter's delta was made for "
                + ", ".join(f"{k} {spec[k]}" for k in differs) + ". "
                f"Load it onto the base model it was trained on ({record.base_model or 'unknown'})."
            )
        shape = tuple(linear_weight(base).shape)
        want = (spec["out_features"], spec["in_features"])
        if shape != want or (spec.get("layer") and spec["layer"] != kind):
            raise ValueError(
                f"adapter {record.name!r} does not fit this model: {mod_name!r} is a {kind} with weight "
                f"(out, in) = {shape}, but the adapter was trained on a {spec.get('layer') or 'layer'} with {want}. "
                f"Load it onto the base model it was trained on ({record.base_model or 'unknown'})."
            )
        found[mod_name] = base
    return found


def build_deltas(model: nn.Module, record: AdapterRecord) -> dict[str, Delta]:
    """Deltas for the record, placed on the device of the weights they will sit on."""
    bases = check_fits(model, record)
    built = {}
    for mod_name, spec in record.modules.items():
        w = linear_weight(bases[mod_name])
        try:
            built[mod_name] = delta_from_spec(spec, record.tensors.get(mod_name, {})).to(w.device)
        except ValueError as e:
            raise ValueError(f"adapter {record.name!r}, module {mod_name!r}: {e}") from None
    return built


def check_record(record: AdapterRecord) -> None:
    """What can be checked without a model, before anything is built: the method config (types, values:
    :func:`deltatune.methods.base.check_fields` and ``validate``) and every module's spec
    (:func:`deltatune.deltas.base.check_spec`). ``ValueError`` naming the module or method field."""
    if not isinstance(record.method, dict):
        raise ValueError(f"'method' must be a JSON object, got {type(record.method).__name__}")
    if not isinstance(record.modules, dict) or not record.modules:
        raise ValueError("'modules' must be a non-empty JSON object {module name: spec}")
    try:
        method = Method.from_dict(record.method)
        check_fields(method)
    except TypeError as e:
        raise ValueError(f"method config: {e}") from None
    method.validate()
    for mod, spec in record.modules.items():
        try:
            check_spec(spec)
        except ValueError as e:
            raise ValueError(f"module {mod!r}: {e}") from None
