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
"""
from __future__ import annotations

import math
import re
import warnings
from collections import Counter

import torch

from ..layers import kind_named
from ..util import progress
from ..deltas import FrozenWeight, delta_from_spec
from ..svd import svd_factors
from ..targets import pattern_value
from .record import AdapterRecord

PREFIX = "base_model.model."

#: the oldest PEFT that loads our exports (checked by tests/test_peft_compat.py against a real install)
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


class NotLowRank(ValueError):
    pass


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


def _in_module_layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    return kind_named(kind).from_linear(t, None).contiguous()


def to_peft(record: AdapterRecord, rank: int | None = None, errors: dict[str, float] | None = None,
            energy: float | None = None, base=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` exactly as PEFT writes them. Deltas that are not a LoRA are factored by
    truncated SVD at ``rank`` (or per module the fewest components holding ``energy`` of ``||dW||_F^2``; their
    relative errors go into ``errors``); without either they raise :class:`NotLowRank`. ``base(module, spec)``
    gives the base weight for deltas whose update depends on it (rotations); without it they raise
    :class:`NeedsBase`."""
    rslora = bool(record.method.get("use_rslora", False))
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas, saved = {}, {}, []
    for mod, spec in progress(record.modules.items(), "export"):
        t, kind = record.tensors[mod], spec.get("layer") or "linear"
        if spec["structure"] == "full":
            saved.append(mod)
            tensors[f"{PREFIX}{mod}.weight"] = _in_module_layout(t["weight"], kind)
            if "bias" in t:
                tensors[f"{PREFIX}{mod}.bias"] = t["bias"]
            continue
        delta = bound_delta(mod, spec, t, base)
        factors = delta.lowrank()
        if factors is None:
            if rank is None and energy is None:
                raise NotLowRank(f"{mod}: a {spec['structure']!r} delta is not a LoRA; give a rank or an energy to "
                                 "export it by truncated SVD (dt.save(..., format='peft', rank=16) or deltatune export "
                                 "--rank 16 / --energy 0.9)")
            B, A, err = svd_factors(delta.dense(), rank, energy)
            factors = (B, A, 1.0)
            if errors is not None:
                errors[mod] = err
        B, A, scale = factors
        if A.shape[0] == 0:  # every component pruned: the module has no update
            continue
        a, b = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PREFIX}{mod}.{a}"] = A
        tensors[f"{PREFIX}{mod}.{b}"] = B
        ranks[mod] = int(A.shape[0])
        alphas[mod] = _number(_alpha(scale, ranks[mod], rslora))
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
        "lora_dropout": float(record.method.get("dropout", 0.0)),
        "use_rslora": rslora,
        "bias": "none",
        "fan_in_fan_out": any(s.get("layer") == "conv1d" for s in record.modules.values()),
        "inference_mode": True,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
        "modules_to_save": sorted(saved) or None,
    }
    assert set(config) == set(EXPORT_KEYS)
    return config, tensors


def _saved_modules(rest: dict[str, torch.Tensor], config: dict, kinds: dict[str, str], modules: dict,
                   out: dict, source: str = "PEFT checkpoint") -> None:
    """``modules_to_save`` entries (full copies of a module's parameters) among the non-adapter tensors."""
    base_copies = sorted(k for k in rest if ".base_layer." in k)
    if base_copies:  # PEFT's save_embedding_layers: copies of the base embeddings, the model has its own
        warnings.warn(f"PEFT checkpoint carries copies of base weights ({', '.join(base_copies[:3])}); deltatune "
                      "keeps the model's own base weights", stacklevel=4)
    for key, t in rest.items():
        if key in base_copies:
            continue
        mod, _, pname = key.rpartition(".")
        mod = mod.replace(".modules_to_save", "")
        saved = any(mod == k or mod.endswith("." + k) for k in config.get("modules_to_save") or [])
        if pname not in ("weight", "bias") or not (mod in kinds or saved):
            raise ValueError(f"{source}: PEFT checkpoint has a tensor deltatune does not understand: {key!r}")
        kind = kinds.get(mod, "linear")  # without a model to look at, assume a Linear head
        if pname == "weight":
            t = _in_module_layout(t, kind)
            modules[mod] = {"structure": "full", "layer": kinds.get(mod), "out_features": t.shape[0],
                            "in_features": t.shape[1]}
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


def _off(*values):
    """A key that deltatune can read only while it has one of PEFT's "off" ``values``."""
    def check(value):
        return None if value in values else f"deltatune reads only {' or '.join(map(repr, values))}"
    return check


def _any(value):
    return None


_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora-ga", "lora_ga")


def _init(value):
    """PiSSA / OLoRA / CorDA / LoftQ / LoRA-GA rewrite the base weights at init: the saved LoRA is relative to
    those rewritten weights, not to the base model deltatune loads it on."""
    if isinstance(value, str) and value.lower().startswith(_RESIDUAL_INITS):
        return ("the adapter is relative to base weights that PEFT rewrote at init; save it from PEFT with "
                "save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a plain LoRA")
    return None


_INFO = ("peft_type", "peft_version", "task_type", "base_model_name_or_path", "revision", "inference_mode",
         "auto_mapping", "runtime_config")
#: every key of PEFT's LoraConfig -> how deltatune treats it on import: ``_any`` (read, or irrelevant to the saved
#: tensors: PEFT's own matching, init-time settings, ``fan_in_fan_out`` which does not change the A/B layout), or a
#: check that returns why a value cannot be read (``None``: fine). A key not listed is refused when set (not
#: None / False / empty): a newer PEFT feature deltatune does not know.
LORA_KEYS = {
    **{k: _any for k in _INFO},
    **{k: _any for k in ("r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "rank_pattern",
                         "alpha_pattern", "modules_to_save", "exclude_modules", "layers_to_transform",
                         "layers_pattern", "fan_in_fan_out", "eva_config", "corda_config", "loftq_config",
                         "lora_ga_config", "ensure_weight_tying", "megatron_core", "qalora_group_size")},
    "init_lora_weights": _init,
    "bias": _off("none"),  # "all" / "lora_only" train biases that deltatune has no delta for
    "use_dora": _off(False, None),
    "lora_bias": _off(False, None),
    "use_qalora": _off(False, None),
    "alora_invocation_tokens": _off(None),  # activated LoRA: the delta applies only after the invocation tokens
    "layer_replication": _off(None, []),  # the model's layers are duplicated before the adapter applies
    "trainable_token_indices": _off(None, {}, []),
    "target_parameters": _off(None, []),  # LoRA on nn.Parameters (MoE experts), not on modules
    "megatron_config": _off(None),
    **{k: _off(None) for k in ("arrow_config", "kasa_config", "monteclora_config", "velora_config", "use_bdlora")},
}
#: AdaLoRA's own keys on top of LoRA's (its rank_pattern holds the final masks; the tensors are already cut)
ADALORA_KEYS = {**LORA_KEYS, **{k: _any for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1",
                                                  "beta2", "orth_reg_weight", "total_step")}}


def check_config(config: dict, source: str, table: dict = LORA_KEYS) -> None:
    """Refuse a PEFT config with a key whose value deltatune cannot load faithfully (see :data:`LORA_KEYS`),
    naming ``source`` (the file) and the key."""
    for key, value in config.items():
        check = table.get(key)
        if check is None:
            why = None if value in (None, False, {}, [], "") else \
                "a PEFT feature deltatune does not know (written by a newer PEFT?)"
        else:
            why = check(value)
        if why:
            raise ValueError(f"{source}: PEFT config key {key!r} = {value!r} is not supported: {why}. deltatune "
                             "would load it as a plain LoRA and compute something else; load it with PEFT")


def _rank_of(mod: str, config: dict, source: str) -> int:
    """The rank PEFT gives module ``mod``: ``rank_pattern`` (PEFT's key rule, run bounded) or ``r``."""
    return int(pattern_value(mod, config.get("rank_pattern"), config["r"], f"{source}: rank_pattern key"))


def from_peft(config: dict, tensors: dict[str, torch.Tensor], name: str, kinds: dict[str, str],
              source: str = "PEFT checkpoint") -> AdapterRecord:
    """Read a PEFT LoRA or AdaLoRA checkpoint; ``kinds`` maps module names of the target model to layer kinds;
    ``source`` (the config file) names the checkpoint in errors.

    Every module's tensor rank must equal the rank its config gives it (``rank_pattern`` / ``r``), as PEFT itself
    requires: weights and config from different saves are refused, not loaded with a wrong scale."""
    ptype = config.get("peft_type")
    if ptype == "ADALORA":
        check_config(config, source, ADALORA_KEYS)
        return _from_adalora(config, tensors, name, kinds, source)
    if ptype != "LORA":
        raise ValueError(f"{source}: PEFT checkpoint of type {ptype!r}: deltatune reads PEFT LoRA and AdaLoRA "
                         "checkpoints")
    check_config(config, source)
    rslora = bool(config.get("use_rslora", False))
    found, rest = _split_keys(tensors, r"lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B")
    modules, out = {}, {}
    for mod, t in found.items():
        embedding = any(k.startswith("lora_embedding") for k in t)
        t = {("A" if "A" in k else "B"): v for k, v in t.items()}
        if set(t) != {"A", "B"}:
            raise ValueError(f"{source}: PEFT checkpoint has an incomplete LoRA for {mod!r} (found {sorted(t)})")
        r, expected = t["A"].shape[0], _rank_of(mod, config, source)
        if t["A"].dim() != 2 or t["B"].dim() != 2 or t["B"].shape[1] != r or r != expected:
            raise ValueError(f"{source}: module {mod!r} has LoRA tensors A {tuple(t['A'].shape)}, B "
                             f"{tuple(t['B'].shape)} but its config gives rank {expected} (r / rank_pattern); the "
                             "weights and the config are not from the same save (a torn or mixed checkpoint)")
        alpha = pattern_value(mod, config.get("alpha_pattern"), config["lora_alpha"], f"{source}: alpha_pattern key")
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        kind = kinds.get(mod) or ("embedding" if embedding else None)
        modules[mod] = {"structure": "lowrank", "layer": kind, "out_features": t["B"].shape[0],
                        "in_features": t["A"].shape[1], "r": r, "scale": scale}
        out[mod] = t
    _saved_modules(rest, config, kinds, modules, out, source)
    method = {"method": "lora", "r": int(config["r"]), "alpha": config["lora_alpha"],
              "dropout": config.get("lora_dropout", 0.0), "use_rslora": rslora,
              "targets": sorted(m for m, s in modules.items() if s["structure"] == "lowrank"),
              "modules_to_save": sorted(m for m, s in modules.items() if s["structure"] == "full") or None,
              "rank_pattern": config.get("rank_pattern") or None, "alpha_pattern": config.get("alpha_pattern") or None}
    return AdapterRecord(name, method, modules, out, base_model=config.get("base_model_name_or_path"),
                         task_type=config.get("task_type"))


def _from_adalora(config: dict, tensors: dict[str, torch.Tensor], name: str, kinds: dict[str, str],
                  source: str = "PEFT checkpoint") -> AdapterRecord:
    found, rest = _split_keys(tensors, "lora_A|lora_B|lora_E")
    init_r, alpha = int(config["init_r"]), config["lora_alpha"]
    scale = (alpha if alpha > 0 else init_r) / init_r
    modules, out = {}, {}
    for mod, t in found.items():
        if set(t) != {"lora_A", "lora_B", "lora_E"}:
            raise ValueError(f"{source}: PEFT AdaLoRA checkpoint has an incomplete triplet for {mod!r} (found {sorted(t)})")
        if kinds.get(mod) not in (None, "linear"):
            raise ValueError(f"{source}: PEFT AdaLoRA on {mod!r} (a {kinds[mod]}): deltatune imports AdaLoRA on Linear layers")
        Q, lam, P = t["lora_A"], t["lora_E"].reshape(-1), t["lora_B"]
        modules[mod] = {"structure": "gated_svd", "layer": kinds.get(mod), "out_features": P.shape[0],
                        "in_features": Q.shape[1], "r": int(lam.shape[0]), "scale": scale}
        out[mod] = {"P": P, "lam": lam, "Q": Q}
    _saved_modules(rest, config, kinds, modules, out, source)
    method = {"method": "adalora", "init_r": init_r, "target_r": int(config.get("target_r", init_r)),
              "alpha": alpha if alpha > 0 else init_r, "dropout": config.get("lora_dropout", 0.0),
              "t_init": config.get("tinit", 0), "t_final": config.get("tfinal", 0), "delta_t": config.get("deltaT", 1),
              "beta1": config.get("beta1", 0.85), "beta2": config.get("beta2", 0.85),
              "orth_reg_weight": config.get("orth_reg_weight", 0.5), "total_step": config.get("total_step"),
              "targets": sorted(m for m, s in modules.items() if s["structure"] == "gated_svd"),
              "modules_to_save": sorted(m for m, s in modules.items() if s["structure"] == "full") or None}
    return AdapterRecord(name, method, modules, out, base_model=config.get("base_model_name_or_path"),
                         task_type=config.get("task_type"))
