"""The Hugging Face PEFT LoRA checkpoint format, both directions.

PEFT stores, for a LoRA on module ``m`` (``base_model.model.`` prefix):

- Linear / Conv1D: ``m.lora_A.weight`` (r x in) and ``m.lora_B.weight`` (out x r);
- Embedding: ``m.lora_embedding_A`` (r x num_embeddings) and ``m.lora_embedding_B`` (dim x r);
- ``modules_to_save``: the module's own parameters, ``m.weight`` / ``m.bias`` (module layout);

and the scale ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), with per-module ``rank_pattern`` and
``alpha_pattern`` overrides whose keys match a module name as ``(.*\\.)?key$``.
"""
from __future__ import annotations

import math
import re
import warnings
from collections import Counter

import torch

from .. import __version__
from .record import AdapterRecord

PREFIX = "base_model.model."

# the fields PEFT writes for a plain LoRA (values for features deltatune does not use are PEFT's defaults)
_PEFT_DEFAULTS = {
    "alora_invocation_tokens": None, "arrow_config": None, "auto_mapping": None, "corda_config": None,
    "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
    "inference_mode": True, "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
    "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_bias": False,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "monteclora_config": None,
    "qalora_group_size": 16, "revision": None, "target_parameters": None, "trainable_token_indices": None,
    "use_bdlora": None, "use_dora": False, "use_qalora": False, "velora_config": None,
}


class NotLowRank(ValueError):
    pass


def _number(x: float):
    return int(round(x)) if abs(x - round(x)) < 1e-6 else x


def _alpha(scale: float, r: int, rslora: bool) -> float:
    return scale * (math.sqrt(r) if rslora else r)


def _in_module_layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    return t if kind == "linear" else t.t().contiguous()


def to_peft(record: AdapterRecord) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` exactly as PEFT writes them. Raises :class:`NotLowRank` for other structures."""
    rslora = bool(record.method.get("use_rslora", False))
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas, saved = {}, {}, []
    for mod, spec in record.modules.items():
        t, kind = record.tensors[mod], spec.get("layer", "linear")
        if spec["structure"] == "full":
            saved.append(mod)
            tensors[f"{PREFIX}{mod}.weight"] = _in_module_layout(t["weight"], kind)
            if "bias" in t:
                tensors[f"{PREFIX}{mod}.bias"] = t["bias"]
            continue
        if spec["structure"] != "lowrank":
            raise NotLowRank(f"{mod}: a {spec['structure']!r} delta is not a LoRA; export it with a rank "
                             "(truncated SVD) instead")
        a, b = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PREFIX}{mod}.{a}"] = t["A"]
        tensors[f"{PREFIX}{mod}.{b}"] = t["B"]
        ranks[mod] = int(spec["r"])
        alphas[mod] = _number(_alpha(spec["scale"], spec["r"], rslora))
    if not ranks:
        raise NotLowRank(f"adapter {record.name!r} has no low-rank deltas to export")
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        **_PEFT_DEFAULTS,
        "peft_type": "LORA",
        "peft_version": f"deltatune-{__version__}",
        "task_type": record.task_type,
        "base_model_name_or_path": record.base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": float(record.method.get("dropout", 0.0)),
        "use_rslora": rslora,
        "bias": "none",
        "target_modules": sorted(ranks),
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
        "modules_to_save": sorted(saved) or None,
    }
    return config, tensors


def _pattern(name: str, patterns: dict, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def from_peft(config: dict, tensors: dict[str, torch.Tensor], name: str, kinds: dict[str, str]) -> AdapterRecord:
    """Read a PEFT LoRA checkpoint; ``kinds`` maps module names of the target model to their layer kind."""
    ptype = config.get("peft_type")
    if ptype != "LORA":
        raise ValueError(f"PEFT checkpoint of type {ptype!r}: deltatune reads PEFT LoRA checkpoints")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise ValueError(f"PEFT LoRA with {flag}=True is not supported")
    rslora = bool(config.get("use_rslora", False))
    modules, out = {}, {}
    rest = {}
    for key, t in tensors.items():
        key = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)", key)
        if m is None:
            rest[key] = t
            continue
        out.setdefault(m.group(1), {})["A" if "A" in m.group(2) else "B"] = t
    for mod, t in out.items():
        if set(t) != {"A", "B"}:
            raise ValueError(f"PEFT checkpoint has an incomplete LoRA for {mod!r} (found {sorted(t)})")
        r = t["A"].shape[0]
        alpha = _pattern(mod, config.get("alpha_pattern") or {}, config["lora_alpha"])
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        modules[mod] = {"structure": "lowrank", "layer": kinds.get(mod), "out_features": t["B"].shape[0],
                        "in_features": t["A"].shape[1], "r": r, "scale": scale}
    base_copies = sorted(k for k in rest if ".base_layer." in k)
    if base_copies:  # PEFT's save_embedding_layers: copies of the base embeddings, the model has its own
        warnings.warn(f"PEFT checkpoint carries copies of base weights ({', '.join(base_copies[:3])}); deltatune "
                      "keeps the model's own base weights", stacklevel=3)
    for key, t in rest.items():
        if key in base_copies:
            continue
        mod, _, pname = key.rpartition(".")
        mod = mod.replace(".modules_to_save", "")
        saved = any(mod == k or mod.endswith("." + k) for k in config.get("modules_to_save") or [])
        if pname not in ("weight", "bias") or not (mod in kinds or saved):
            raise ValueError(f"PEFT checkpoint has a tensor deltatune does not understand: {key!r}")
        kind = kinds.get(mod, "linear")  # without a model to look at, assume a Linear head
        if pname == "weight":
            t = _in_module_layout(t, kind)
            modules[mod] = {"structure": "full", "layer": kinds.get(mod), "out_features": t.shape[0],
                            "in_features": t.shape[1]}
        out.setdefault(mod, {})[pname] = t
    method = {"method": "lora", "r": int(config["r"]), "alpha": config["lora_alpha"],
              "dropout": config.get("lora_dropout", 0.0), "use_rslora": rslora,
              "targets": sorted(m for m, s in modules.items() if s["structure"] == "lowrank"),
              "modules_to_save": sorted(m for m, s in modules.items() if s["structure"] == "full") or None,
              "rank_pattern": config.get("rank_pattern") or None, "alpha_pattern": config.get("alpha_pattern") or None}
    return AdapterRecord(name, method, modules, out, base_model=config.get("base_model_name_or_path"),
                         task_type=config.get("task_type"))
