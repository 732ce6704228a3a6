"""The Hugging Face PEFT LoRA checkpoint format, both directions, and import of PEFT AdaLoRA checkpoints.

PEFT stores, for a LoRA on module ``m`` (``base_model.model.`` prefix):

- Linear / Conv1D: ``m.lora_A.weight`` (r x in) and ``m.lora_B.weight`` (out x r);
- Embedding: ``m.lora_embedding_A`` (r x num_embeddings) and ``m.lora_embedding_B`` (dim x r);
- ``modules_to_save``: the module's own parameters, ``m.weight`` / ``m.bias`` (module layout);

and the scale ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), with per-module ``rank_pattern`` and
``alpha_pattern`` overrides whose keys match a module name as ``(.*\\.)?key$``.

Every other structure (sparse, sliced, ...) exports by truncated SVD of its dense update at a chosen rank,
``dW ~ U_r diag(S_r) Vh_r`` (``B = U_r diag(S_r)``, ``A = Vh_r``, scale 1), with the relative Frobenius error
``||dW - B A|| / ||dW|| = sqrt(sum_{i>r} S_i^2 / sum_i S_i^2)`` reported per module.

Every delta that is exactly a LoRA (:meth:`Delta.lowrank` returns its factors: plain and anchored low-rank,
gated SVD with the gates folded into ``B``) exports as one. PEFT AdaLoRA checkpoints store ``m.lora_A`` (r x in),
``m.lora_E`` (r x 1) and ``m.lora_B`` (out x r), already cut to the final rank pattern, with the scale
``lora_alpha / init_r`` (PEFT keeps the initial rank as ``ranknum``); they import as gated-SVD deltas.

This module is a loop over registered codecs: beyond the target format itself (LoRA factors under
:class:`~deltatune.deltas.LowRankDelta`'s key names, PEFT's ``modules_to_save`` as
:class:`~deltatune.deltas.FullDelta` modules) it knows no structure or method. Each delta structure says how it
is written (:meth:`deltatune.deltas.Delta.peft_export`, with any further tensors in ``PeftTensors.extra``) and, if
PEFT stores it, read (its ``from_peft``); each method says how its config maps to PEFT's
(:meth:`deltatune.methods.Method.peft_lora` on export, whose keys beyond ``lora_dropout`` / ``use_rslora`` go into
the config as they are; ``peft_type``, ``peft_keys``, ``peft_rank``, ``peft_scale``, ``from_peft_config`` on
import).
"""
from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass

import torch

from ..deltas import FrozenWeight, FullDelta, LowRankDelta, NotLowRank, delta_from_spec, structure_class
from ..deltas.lowrank import PEFT_FAN_IN_FAN_OUT
from ..checks import finite_number, positive_int
from ..layers import GUESSED_KINDS, kind_named
from ..methods import Method
from ..methods.base import method_classes
from ..methods.peft import LORA_KEYS, check_config  # noqa: F401 (LORA_KEYS: PEFT LoRA's config keys, re-exported)
from ..targets import spec_matcher
from ..util import progress
from .record import AdapterRecord

PREFIX = "base_model.model."

#: the oldest PEFT that loads our exports (checked by tests/io/test_peft_format.py against a real install)
PEFT_MIN = "0.13"

#: the keys an export writes: the ones the adapter needs, all known to every PEFT since :data:`PEFT_MIN`. PEFT
#: fills every other key with its own default (each one a feature deltatune does not use). Writing PEFT's full key
#: set instead breaks older PEFTs: 0.13 refuses unknown keys, and 0.14 to 0.16 loading through transformers'
#: ``load_adapter`` (at least 0.14) drops *every* LoRA key on meeting one unknown key (r, lora_alpha, rank_pattern, ... back to
#: defaults: wrong scale, size mismatches).
EXPORT_KEYS = ("peft_type", "task_type", "base_model_name_or_path", "inference_mode", "r", "lora_alpha",
               "lora_dropout", "use_rslora", "bias", "fan_in_fan_out", "target_modules", "rank_pattern",
               "alpha_pattern", "modules_to_save")


#: PEFT task types whose model wrapper adds the task head to ``modules_to_save`` and then requires it in the
#: checkpoint: an adapter without a trained head is written without a task type (it loads as a plain PeftModel)
HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


class NeedsBase(ValueError):
    pass


def bound_delta(mod: str, spec: dict, tensors: dict[str, torch.Tensor], base=None):
    """The delta of one module, bound to its base weight when its update depends on it (a rotation, a module kept
    whole); ``base(module, spec)`` returns that weight (linear layout) and bias."""
    delta = delta_from_spec(spec, tensors)
    if delta.needs_base:
        if base is None:
            raise NeedsBase(f"{mod}: the update of a {spec['structure']!r} delta is relative to the base model's "
                            "weight, which a checkpoint does not hold; work on the model (dt.save(model, path, "
                            "format='peft', rank=16), dt.combine) or give the base model's safetensors (deltatune "
                            "export --base MODEL_DIR; 'base: MODEL_DIR' in MERGE.yaml)")
        weight, bias = base(mod, spec)
        delta = delta.to(weight.device)
        delta.bind(FrozenWeight(weight, bias))
    return delta


def _number(x: float):
    return int(round(x)) if abs(x - round(x)) < 1e-6 else x


def _alpha(scale: float, r: int, rslora: bool) -> float:
    return scale * (math.sqrt(r) if rslora else r)


#: the layer kind assumed for a module whose kind a record does not say (PEFT's own default: a Linear)
DEFAULT_KIND = "linear"


def _in_module_layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    return kind_named(kind).from_linear(t, None).contiguous()


def _module_tensors(mod: str, spec: dict, t: dict, base, rank, energy):
    """The structure's :meth:`~deltatune.deltas.Delta.peft_export` of one module, errors named after ``mod``."""
    try:
        return structure_class(spec["structure"]).peft_export(spec, t, lambda: bound_delta(mod, spec, t, base),
                                                              rank, energy)
    except NotLowRank as e:
        raise NotLowRank(f"{mod}: {e}") from None


@dataclass
class ModuleLora:
    """One module of an export: its layer ``kind``, and either a LoRA ``dW = scale B A`` with ``B``, ``A`` in the
    kind's file layout (:attr:`~deltatune.layers.LayerKind.lora_to_file`; ``extra``: further PEFT tensors) or, with
    ``saved``, the module's own parameters in module layout (PEFT's ``modules_to_save``)."""

    kind: str
    B: torch.Tensor | None = None
    A: torch.Tensor | None = None
    scale: float = 1.0
    extra: dict | None = None
    saved: dict | None = None

    @property
    def r(self) -> int:
        return int(self.A.shape[0])


def export_modules(record: AdapterRecord, rank: int | None = None, errors: dict[str, float] | None = None,
                   energy: float | None = None, base=None):
    """``(module, ModuleLora)`` for every module of ``record`` with an update, as :func:`to_peft` writes them (the
    file formats built on PEFT's share this)."""
    for mod, spec in progress(record.modules.items(), "export"):
        kind = spec.get("layer") or DEFAULT_KIND
        out = _module_tensors(mod, spec, record.tensors[mod], base, rank, energy)
        if out.saved is not None:
            yield mod, ModuleLora(kind, saved={p: _in_module_layout(t, kind) if p == "weight" else t
                                               for p, t in out.saved.items()})
            continue
        if out.error is not None and errors is not None:
            errors[mod] = out.error
        if out.A.shape[0] == 0:  # every component pruned: the module has no update
            continue
        try:
            B, A = kind_named(kind).lora_to_file(out.B, out.A, spec)
        except ValueError as e:
            raise NotLowRank(f"{mod}: {e}") from None
        yield mod, ModuleLora(kind, B.contiguous(), A.contiguous(), out.scale, out.extra)


def to_peft(record: AdapterRecord, rank: int | None = None, errors: dict[str, float] | None = None,
            energy: float | None = None, base=None, prefix: str = PREFIX) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` exactly as PEFT writes them. Deltas that are not a LoRA are factored by
    truncated SVD at ``rank`` (or per module the fewest components holding ``energy`` of ``||dW||_F^2``; their
    relative errors go into ``errors``); without either they raise :class:`NotLowRank`. ``base(module, spec)``
    gives the base weight for deltas whose update depends on it (rotations); without it they raise
    :class:`NeedsBase`. ``prefix``: what precedes module names in tensor keys (diffusers: none, or the
    pipeline component's ``unet.``)."""
    lora = _peft_lora(record.method)
    rslora = lora["use_rslora"]
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas, saved = {}, {}, []
    for mod, m in export_modules(record, rank, errors, energy, base):
        if m.saved is not None:
            saved.append(mod)
            tensors.update({f"{prefix}{mod}.{pname}": t for pname, t in m.saved.items()})
            continue
        a, b = LowRankDelta.peft_keys(m.kind)
        tensors[f"{prefix}{mod}.{a}"] = m.A
        tensors[f"{prefix}{mod}.{b}"] = m.B
        for suffix, t in (m.extra or {}).items():
            tensors[f"{prefix}{mod}.{suffix}"] = t
        ranks[mod] = m.r
        alphas[mod] = _number(_alpha(m.scale, m.r, rslora))
    if not ranks:
        raise NotLowRank(f"adapter {record.name!r} has no low-rank deltas to export")
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": record.task_type if saved or record.task_type not in HEAD_TASKS else None,
        "base_model_name_or_path": record.base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": lora["lora_dropout"],
        "use_rslora": rslora,
        "bias": "none",
        "fan_in_fan_out": any(s.get("layer") in PEFT_FAN_IN_FAN_OUT for s in record.modules.values()),
        "inference_mode": True,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
        "modules_to_save": sorted(saved) or None,
        **{k: v for k, v in lora.items() if k not in ("lora_dropout", "use_rslora")},  # a method's own keys
    }
    assert set(EXPORT_KEYS) <= set(config)
    return config, tensors


def _peft_lora(method: dict) -> dict:
    """The method's keys of the exported LoRA config (:meth:`~deltatune.methods.Method.peft_lora`); for a method
    this deltatune does not know (a file from a newer one), what its config says about dropout and rsLoRA."""
    try:
        return Method.from_dict(method).peft_lora()
    except ValueError:
        return {"lora_dropout": float(method.get("dropout", 0.0) or 0.0),
                "use_rslora": bool(method.get("use_rslora", method.get("rslora", False)))}


def _saved_modules(rest: dict[str, torch.Tensor], config: dict, kinds: dict[str, str], modules: dict,
                   out: dict, source: str = "PEFT checkpoint") -> None:
    """``modules_to_save`` entries (full copies of a module's parameters) among the non-adapter tensors."""
    listed = spec_matcher(list(config.get("modules_to_save") or []), "modules_to_save")  # names or suffixes
    base_copies = sorted(k for k in rest if ".base_layer." in k)
    if base_copies:  # PEFT's save_embedding_layers: copies of the base embeddings, the model has its own
        warnings.warn(f"PEFT checkpoint carries copies of base weights ({', '.join(base_copies[:3])}); deltatune "
                      "keeps the model's own base weights", stacklevel=4)
    for key, t in rest.items():
        if key in base_copies:
            continue
        mod, _, pname = key.rpartition(".")
        mod = mod.replace(".modules_to_save", "")
        if pname not in ("weight", "bias") or not (mod in kinds or listed(mod)):
            raise ValueError(f"{source}: PEFT checkpoint has a tensor deltatune does not understand: {key!r}")
        if pname == "weight":
            t = kind_named(kinds.get(mod, DEFAULT_KIND)).to_linear(t).contiguous()  # no model: a Linear head
            modules[mod] = FullDelta.spec_for(t.shape[0], t.shape[1], layer=kinds.get(mod))
        out.setdefault(mod, {})[pname] = t


def _split_keys(tensors: dict[str, torch.Tensor], pattern: str) -> tuple[dict, dict]:
    """``({module: {group(2): tensor}}, {other key: tensor})`` for keys matching ``(module).(pattern)``."""
    found, rest = {}, {}
    for key, t in tensors.items():
        key = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = re.fullmatch(rf"(.+)\.({pattern})", key)
        if m is None:
            rest[key] = t
        else:
            found.setdefault(m.group(1), {})[m.group(2)] = t
    return found, rest


def file_kind(mod: str, t: dict[str, torch.Tensor], kinds: dict[str, str]) -> str | None:
    """The layer kind of a module's file tensors ``t``: the model's (``kinds``); without a model, a kind the
    factors' number of dimensions says beyond the linear layout's 2 (:data:`~deltatune.layers.GUESSED_KINDS`: 4-D
    factors are a Conv2d's), else ``None`` (read from the tensor names)."""
    if mod in kinds:
        return kinds[mod]
    dims = {v.dim() for v in t.values()}
    return GUESSED_KINDS.get(dims.pop()) if len(dims) == 1 and dims != {2} else None


def _from_file_layout(mod: str, t: dict[str, torch.Tensor], kind: str | None, source: str
                      ) -> tuple[dict, dict, tuple[int, int] | None]:
    """A module's LoRA tensors from its kind's file layout to the linear layout
    (:attr:`~deltatune.layers.LayerKind.lora_from_file`), the layer geometry they say (a conv's kernel and
    groups, checked against the model's layer on load), and ``(R, r)``: the rank of the file's ``lora_A`` (the
    rank the config gives) and of the linear layout's ``A`` (``None`` when nothing was converted)."""
    a, b = LowRankDelta.peft_keys(kind)
    if kind is None or a not in t or b not in t:
        return t, {}, None
    try:
        B, A, geometry = kind_named(kind).lora_from_file(t[b], t[a])
    except ValueError as e:
        raise ValueError(f"{source}: module {mod!r} ({kind_named(kind).title or kind}): {e}") from None
    return {**t, a: A, b: B}, geometry, (int(t[a].shape[0]), int(A.shape[0]))


PEFT_NUMBERS = ("r", "lora_alpha", "lora_dropout", "init_r", "target_r")  # numbers in a PEFT config
PEFT_SIZES = ("r", "init_r", "target_r")  # of which positive integers
PEFT_FLAGS = ("use_rslora",)  # true or false


def check_peft_values(config: dict, source: str) -> None:
    """PEFT's scalars (:data:`PEFT_NUMBERS`, :data:`PEFT_FLAGS`), checked before any arithmetic uses them: a
    ``ValueError`` naming ``source`` and the key (an ``adapter_config.json`` and a diffusers file's metadata alike)."""
    for key in (*PEFT_NUMBERS, *PEFT_FLAGS):
        value = config.get(key)
        if value is None:
            continue
        try:
            if key in PEFT_FLAGS:
                if not isinstance(value, bool):
                    raise TypeError(f"must be true or false, got {value!r} ({type(value).__name__})")
            else:
                (positive_int if key in PEFT_SIZES else finite_number)(value, "it")
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: PEFT config key {key!r} {str(e).removeprefix('it ')}") from None


def peft_reader(config: dict, source: str) -> type[Method]:
    """The method that reads a PEFT checkpoint of this ``config`` (the last registered one whose
    :meth:`~deltatune.methods.Method.reads_peft` accepts it)."""
    readers = [cls for cls in method_classes() if "peft_type" in vars(cls) and cls.reads_peft(config)]
    if not readers:
        known = sorted({cls.peft_type for cls in method_classes() if cls.peft_type})
        raise ValueError(f"{source}: PEFT checkpoint of type {config.get('peft_type')!r}: deltatune reads PEFT "
                         f"{' and '.join(known)} checkpoints")
    return readers[-1]


def from_peft(config: dict, tensors: dict[str, torch.Tensor], name: str, kinds: dict[str, str],
              source: str = "PEFT checkpoint") -> AdapterRecord:
    """Read a PEFT LoRA or AdaLoRA checkpoint; ``kinds`` maps module names of the target model to layer kinds;
    ``source`` (the config file) names the checkpoint in errors.

    Every module's tensor rank must equal the rank its config gives it (``rank_pattern`` / ``r``), as PEFT itself
    requires: weights and config from different saves are refused, not loaded with a wrong scale."""
    check_peft_values(config, source)
    reader = peft_reader(config, source)
    check_config(config, source, reader.peft_keys)
    missing = [k for k in reader.peft_required if k not in config]
    if missing:
        raise KeyError(missing[0])  # the caller names the file and the key
    structure = structure_class(reader.peft_structure)
    found, rest = _split_keys(tensors, "|".join(re.escape(n) for n in structure.peft_names()))
    modules, out = {}, {}
    for mod, t in found.items():
        kind = file_kind(mod, t, kinds)
        t, geometry, ranks = _from_file_layout(mod, t, kind, source)
        rank, scale = reader.peft_rank(config, mod, source), lambda r, mod=mod: reader.peft_scale(config, mod, r, source)
        if ranks is not None and ranks[0] != ranks[1] and rank == ranks[0]:
            # the file layout holds the LoRA at another rank (a grouped conv's block-diagonal lora_A, R = g r): the
            # config's rank and scale are the file's
            rank, scale = ranks[1], lambda _, mod=mod, R=ranks[0]: reader.peft_scale(config, mod, R, source)
        modules[mod], out[mod] = structure.from_peft(mod, t, kind, rank, scale, source)
        modules[mod].update(geometry)
    _saved_modules(rest, config, kinds, modules, out, source)
    method = reader.from_peft_config(config, sorted(m for m in modules if m in found),
                                     sorted(m for m in modules if m not in found))
    return AdapterRecord(name, method, modules, out, base_model=config.get("base_model_name_or_path"),
                         task_type=config.get("task_type"))
