"""The kohya / A1111 LoRA file (kohya-ss sd-scripts, AUTOMATIC1111, ComfyUI), both directions.

For a LoRA ``dW = (alpha / r) up @ down`` on module ``m`` of a pipeline component, one safetensors file holds:

- ``<prefix>_<m with "." -> "_">.lora_down.weight``: ``down`` (r x in; a conv: ``(r, in, *kernel)``, PEFT's conv
  layout, :func:`deltatune.layers.conv_lora_to_file`);
- ``....lora_up.weight``: ``up`` (out x r; a conv: ``(out, r, 1, ...)``);
- ``....alpha``: ``alpha`` as a 0-d tensor; a missing ``alpha`` means ``alpha = r``;

with ``<prefix>`` ``lora_unet`` (the UNet or transformer), ``lora_te`` / ``lora_te1`` / ``lora_te2`` (text
encoders). kohya spells a diffusers UNet's modules by their diffusers path (``lora_unet_down_blocks_0_resnets_0_conv1``),
which diffusers' own converter (``_convert_non_diffusers_lora_to_diffusers``, used by ``load_lora_weights``) maps
back; SDXL files from kohya's own UNet (``input_blocks_4_1_...``) name modules the diffusers model does not have.

Reading a file needs the model: ``_`` is ambiguous, so each key's name is matched against the model's module
names spelled the same way. Files of other networks are refused naming the key: DoRA (``dora_scale``),
LyCORIS Tucker (``lora_mid``), LoHa (``hada_*``), LoKr (``lokr_*``); kohya has no grouped-conv LoRA, so neither
does an export. An export's deltas are those of the PEFT export (:func:`~deltatune.io.peft_format.export_modules`).
"""
from __future__ import annotations

import difflib
import math
from collections import Counter

import torch

from ..deltas import NotLowRank
from .diffusers_format import NAME_KEY, choose_component, kept_keys
from .peft_format import export_modules, from_peft
from .record import AdapterRecord

#: the kohya name prefix of each pipeline component
PREFIXES = {"unet": "lora_unet", "transformer": "lora_unet", "text_encoder": "lora_te", "text_encoder_1": "lora_te1",
            "text_encoder_2": "lora_te2"}
DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
#: tensors of networks that are not a LoRA, by the part of the key that says so
UNSUPPORTED = {"dora_scale": "a DoRA magnitude; deltatune has no DoRA yet",
               "lora_mid": "a LyCORIS Tucker factor", "hada_": "a LoHa factor", "lokr_": "a LoKr factor"}


def kohya_name(module: str, prefix: str) -> str:
    return f"{prefix}_{module.replace('.', '_')}"


def prefix_of(component: str) -> str:
    if component not in PREFIXES:
        raise ValueError(f"component {component!r} has no kohya prefix; known: {', '.join(PREFIXES)}")
    return PREFIXES[component]


def to_kohya(record: AdapterRecord, component: str = "unet", rank: int | None = None, errors: dict | None = None,
             energy: float | None = None, base=None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, safetensors metadata)`` of the kohya file of ``record`` for pipeline ``component``.

    Every module gets the same ``alpha`` (the most common ``s r``); a module of another scale ``s`` carries the
    ratio in ``up``: ``(alpha / r) (up s r / alpha) down = s up down``, the same update for every reader. (diffusers
    0.42's kohya converter keys the alphas of attention layers by names no module has, so it would give them the
    common alpha anyway.)"""
    prefix = prefix_of(component)
    modules = list(export_modules(record, rank, errors, energy, base))
    for mod, m in modules:
        if m.saved is not None or m.extra:
            raise NotLowRank(f"{mod}: kohya files hold LoRA factors only (this module is kept whole or carries "
                             "more tensors): save the adapter in deltatune's or PEFT's format")
        groups = int(record.modules[mod].get("groups", 1))  # the layer's geometry (LayerKind.geometry)
        if groups > 1:
            raise NotLowRank(f"{mod}: a grouped convolution (groups {groups}); kohya files have no "
                             "grouped-conv LoRA: use the PEFT or diffusers format")
    if not modules:
        raise NotLowRank(f"adapter {record.name!r} has no low-rank deltas to export")
    alpha = Counter(m.scale * m.r for _, m in modules).most_common(1)[0][0]
    tensors: dict[str, torch.Tensor] = {}
    for mod, m in modules:
        n = kohya_name(mod, prefix)
        tensors[f"{n}.{DOWN}"] = m.A
        tensors[f"{n}.{UP}"] = m.B if m.scale * m.r == alpha else m.B * (m.scale * m.r / alpha)
        tensors[f"{n}.{ALPHA}"] = torch.tensor(alpha, dtype=torch.float32)
    return tensors, {"format": "pt", NAME_KEY: record.name}


def is_kohya(keys) -> bool:
    return any(k.split(".", 1)[0].startswith(tuple(f"{p}_" for p in PREFIXES.values())) for k in keys)


def _split(key: str) -> tuple[str, str]:
    name, _, rest = key.partition(".")
    return name, rest


def from_kohya(tensors: dict[str, torch.Tensor], name: str, kinds: dict[str, str], source: str,
               component: str | None = None) -> tuple[AdapterRecord, dict[str, str]]:
    """``(record, {module: the file's lora name})`` of a kohya file for the model whose module kinds are
    ``kinds``; ``source`` names the file in errors; ``component``: which pipeline component's keys to load
    (:func:`~deltatune.io.diffusers_format.choose_component`; the others are skipped with a warning)."""
    for key in tensors:
        why = next((w for part, w in UNSUPPORTED.items() if part in key), None)
        if why is not None:
            raise ValueError(f"{source}: key {key!r} is {why}; deltatune loads plain kohya LoRA files only")
    prefixes = {p for p in PREFIXES.values() for k in tensors if _split(k)[0].startswith(f"{p}_")}
    prefix = choose_component(prefixes, component, source, spell=prefix_of)
    tensors = kept_keys(tensors, lambda k: not any(_split(k)[0].startswith(f"{p}_") for p in prefixes - {prefix}),
                        prefix, source)
    by_name: dict[str, list[str]] = {}
    for mod in kinds:
        by_name.setdefault(kohya_name(mod, prefix), []).append(mod)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        lora, rest = _split(key)
        if not lora.startswith(f"{prefix}_") or rest not in (DOWN, UP, ALPHA):
            raise ValueError(f"{source}: key {key!r} is not a kohya LoRA tensor ({prefix}_<module>.{DOWN} / "
                             f".{UP} / .{ALPHA})")
        mods = by_name.get(lora, [])
        if len(mods) != 1:
            close = difflib.get_close_matches(lora, list(by_name), n=3, cutoff=0.5)
            raise ValueError(f"{source}: key {key!r} names a module this model " + (
                f"has twice ({', '.join(mods)})" if mods else f"lacks (close names: {close or 'none'}); is the file "
                "for another model?"))
        groups.setdefault(mods[0], {})[rest] = t
    peft_tensors, ranks, alphas, names = {}, {}, {}, {}
    for mod, t in groups.items():
        names[mod] = kohya_name(mod, prefix)
        if DOWN not in t or UP not in t:
            raise ValueError(f"{source}: {names[mod]!r} lacks its {DOWN if DOWN not in t else UP}")
        r = int(t[DOWN].shape[0])
        if ALPHA in t and t[ALPHA].numel() != 1:
            raise ValueError(f"{source}: {names[mod]}.{ALPHA} has shape {tuple(t[ALPHA].shape)}, not a scalar")
        alpha = float(t[ALPHA]) if ALPHA in t else float(r)
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"{source}: {names[mod]}.{ALPHA} is {alpha}; it must be a positive number")
        peft_tensors[f"{mod}.lora_A.weight"], peft_tensors[f"{mod}.lora_B.weight"] = t[DOWN], t[UP]
        ranks[mod], alphas[mod] = r, int(alpha) if alpha == int(alpha) else alpha
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(ranks),
              "rank_pattern": {m: v for m, v in ranks.items() if v != r},
              "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha}}
    return from_peft(config, peft_tensors, name, kinds, source=source), names
