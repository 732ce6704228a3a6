"""The LoRA file diffusers writes and reads (``save_lora_adapter`` / ``load_lora_adapter`` on a model,
``save_lora_weights`` / ``load_lora_weights`` on a pipeline), both directions.

One safetensors file, ``pytorch_lora_weights.safetensors``:

- tensors: PEFT's LoRA keys without PEFT's ``base_model.model.`` and without an adapter name,
  ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight`` (conv LoRA in PEFT's conv layout, see
  :func:`deltatune.layers.conv_lora_to_file`). ``<component>`` is the pipeline's name for the model (``unet``,
  ``transformer``, ``text_encoder``); a model's own ``save_lora_adapter`` writes no component;
- safetensors metadata ``deltatune_adapter_name``: the adapter's name (read back by ``dt.load``, ignored by
  diffusers);
- safetensors metadata ``lora_adapter_metadata``: the ``LoraConfig`` as JSON (its keys prefixed ``<component>.``
  in the pipeline format). diffusers builds its ``LoraConfig`` from it; without it diffusers takes each module's
  rank from ``lora_B.shape[1]`` and ``lora_alpha = r`` (scale 1), and so does :func:`from_diffusers` (the rank
  from ``lora_A``: :func:`inferred_config`).

The config and tensors are PEFT's (:func:`~deltatune.io.peft_format.to_peft` / ``from_peft``): every structure
that exports to PEFT exports here. diffusers' loader reads no ``modules_to_save``: a module kept whole is refused.
"""
from __future__ import annotations

import json
import warnings
from collections import Counter

import torch

from ..deltas import NotLowRank
from .peft_format import from_peft, to_peft
from .record import AdapterRecord

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
#: safetensors metadata key of the adapter's name (diffusers reads only :data:`METADATA_KEY`; kohya readers their
#: ``ss_*`` keys): what ``dt.load`` names the adapter when not told otherwise
NAME_KEY = "deltatune_adapter_name"
#: the component a pipeline file names by default (``pipe.load_lora_weights`` loads ``unet.*`` into the UNet)
DEFAULT_COMPONENT = "unet"


def _prefixed(component: str | None) -> str:
    return f"{component}." if component else ""


def to_diffusers(record: AdapterRecord, component: str | None = DEFAULT_COMPONENT, rank: int | None = None,
                 errors: dict | None = None, energy: float | None = None, base=None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, safetensors metadata)`` of the diffusers LoRA file; ``component=None``: a model's own file (what
    ``model.save_lora_adapter`` writes and ``model.load_lora_adapter(path, prefix=None)`` reads)."""
    config, tensors = to_peft(record, rank, errors, energy, base, prefix=_prefixed(component))
    if config["modules_to_save"]:
        raise NotLowRank(f"adapter {record.name!r} keeps modules whole ({', '.join(config['modules_to_save'])}), "
                         "which diffusers' LoRA loader does not read: save it in deltatune's or PEFT's format")
    config = {k: v for k, v in config.items() if v is not None}
    meta = {f"{_prefixed(component)}{k}": v for k, v in config.items()}
    return tensors, {"format": "pt", NAME_KEY: record.name, METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)}


def components(keys, children: set[str]) -> set[str]:
    """The pipeline components a file's keys are prefixed with: first name parts that are not children of the
    model (``{""}``: keys name the model's modules directly)."""
    return {k.split(".", 1)[0] if k.split(".", 1)[0] not in children else "" for k in keys}


def choose_component(found: set[str], component: str | None, source: str, spell=lambda c: c) -> str:
    """The component a load keeps of a file whose keys are for the components ``found`` (as the file spells them:
    ``spell(component)``): ``component`` itself; without it the only one, or in a file of several
    :data:`DEFAULT_COMPONENT` (what ``pipe.load_lora_weights`` gives the UNet). A file of the model's own keys
    (``{""}``, ``save_lora_adapter``) is that model's whatever its component."""
    if found == {""}:
        return ""
    if component is not None:
        if spell(component) not in found:
            raise ValueError(f"{source} holds no LoRA for component {component!r} (it has "
                             f"{', '.join(sorted(c or '(none)' for c in found))}): pass another component=")
        return spell(component)
    if len(found) == 1:
        return next(iter(found))
    if spell(DEFAULT_COMPONENT) in found:
        return spell(DEFAULT_COMPONENT)
    raise ValueError(f"{source} holds LoRAs for several pipeline components "
                     f"({', '.join(sorted(c or '(none)' for c in found))}): say which with component=")


def kept_keys(tensors: dict, keep, chosen: str, source: str) -> dict:
    """The tensors of the chosen component (``keep(key)``); one warning names how many keys of others are skipped
    (as diffusers' own loaders skip them for a UNet)."""
    kept = {k: t for k, t in tensors.items() if keep(k)}
    if len(kept) < len(tensors):
        warnings.warn(f"{source}: loading the LoRA of {chosen or 'the model'}; skipped {len(tensors) - len(kept)} "
                      "keys of other pipeline components (load them onto those models with component=)",
                      stacklevel=5)
    return kept


def inferred_config(tensors: dict[str, torch.Tensor]) -> dict:
    """diffusers' config for a file without metadata: ``lora_alpha = r`` (scale 1, ``dW = B A``) per module, each
    module's rank ``lora_A.shape[0]``. (diffusers takes ``lora_B.shape[1]``, the same but for a grouped conv, where
    PEFT's ``lora_B`` has ``R / groups`` columns: diffusers 0.42 cannot load such a file; with scale 1 its update
    is still ``B A``, which this reads.)"""
    ranks = {k[: -len(".lora_A.weight")]: int(t.shape[0]) for k, t in tensors.items()
             if k.endswith(".lora_A.weight") and t.dim() > 1}
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    return {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": sorted(ranks),
            "rank_pattern": {m: v for m, v in ranks.items() if v != r},
            "alpha_pattern": {m: v for m, v in ranks.items() if v != r}}


def from_diffusers(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, name: str,
                   kinds: dict[str, str], children: set[str], source: str, component: str | None = None
                   ) -> AdapterRecord:
    """The adapter in a diffusers LoRA file (``tensors`` and its safetensors ``metadata``); ``kinds``: module name ->
    layer kind of the model it loads onto, ``children``: the model's top-level child names (to tell a component
    prefix from a module path); ``source`` names the file in errors. ``component``: which pipeline component's keys
    to load (:func:`choose_component`; the others are skipped with a warning)."""
    chosen = choose_component(components(tensors, children), component, source)
    tensors = kept_keys(tensors, lambda k: components([k], children) == {chosen}, chosen, source)
    dora = next((k for k in tensors if "lora_magnitude_vector" in k), None)
    if dora is not None:
        raise ValueError(f"{source}: {dora!r} is a DoRA magnitude; deltatune has no DoRA yet and cannot load this "
                         "file (loading it as a plain LoRA would give other outputs)")
    prefix = _prefixed(chosen)
    tensors = {k[len(prefix):]: t for k, t in tensors.items()}
    raw = (metadata or {}).get(METADATA_KEY)
    if raw:
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: its metadata {METADATA_KEY!r} is not JSON ({e})") from None
        config = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
    else:
        config = inferred_config(tensors)
    config.setdefault("peft_type", "LORA")
    return from_peft(config, tensors, name, kinds, source=source)
