"""PEFT's ``adapter_config.json`` vocabulary, for the methods that map to it (:mod:`deltatune.io.peft_format`
loops over them).

A method that reads PEFT checkpoints of one ``peft_type`` declares, on its class (see
:class:`deltatune.methods.base.Method`): ``peft_type``, ``peft_structure`` (the delta structure whose
``from_peft`` reads the tensors), ``peft_keys`` (every config key it knows -> how it treats the key, a table built
from :data:`LORA_KEYS` and the checks below) and the class methods ``peft_rank``, ``peft_scale`` and
``from_peft_config``; :meth:`Method.peft_lora` gives any method's keys of an exported LoRA config. This module
holds only the shared tables and checks; it imports nothing of the package.
"""
from __future__ import annotations


def off(*values):
    """A key that deltatune can read only while it has one of PEFT's "off" ``values``."""
    def check(value):
        return None if value in values else f"deltatune reads only {' or '.join(map(repr, values))}"
    return check


def anything(value):
    """A key read as is, or irrelevant to the saved tensors."""
    return None


RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora-ga", "lora_ga")


def plain_init(value):
    """PiSSA / OLoRA / CorDA / LoftQ / LoRA-GA rewrite the base weights at init: the saved LoRA is relative to
    those rewritten weights, not to the base model deltatune loads it on."""
    if isinstance(value, str) and value.lower().startswith(RESIDUAL_INITS):
        return ("the adapter is relative to base weights that PEFT rewrote at init; save it from PEFT with "
                "save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a plain LoRA")
    return None


INFO = ("peft_type", "peft_version", "task_type", "base_model_name_or_path", "revision", "inference_mode",
        "auto_mapping", "runtime_config")
#: every key of PEFT's LoraConfig -> how deltatune treats it on import: :func:`anything` (read, or irrelevant to the
#: saved tensors: PEFT's own matching, init-time settings, ``fan_in_fan_out`` which does not change the A/B layout),
#: or a check that returns why a value cannot be read (``None``: fine). A key not listed is refused when set (not
#: None / False / empty): a newer PEFT feature deltatune does not know.
LORA_KEYS = {
    **{k: anything for k in INFO},
    **{k: anything for k in ("r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "rank_pattern",
                             "alpha_pattern", "modules_to_save", "exclude_modules", "layers_to_transform",
                             "layers_pattern", "fan_in_fan_out", "eva_config", "corda_config", "loftq_config",
                             "lora_ga_config", "ensure_weight_tying", "megatron_core", "qalora_group_size")},
    "init_lora_weights": plain_init,
    "bias": off("none"),  # "all" / "lora_only" train biases that deltatune has no delta for
    "use_dora": off(False, None),
    "lora_bias": off(False, None),
    "use_qalora": off(False, None),
    "alora_invocation_tokens": off(None),  # activated LoRA: the delta applies only after the invocation tokens
    "layer_replication": off(None, []),  # the model's layers are duplicated before the adapter applies
    "trainable_token_indices": off(None, {}, []),
    "target_parameters": off(None, []),  # LoRA on nn.Parameters (MoE experts), not on modules
    "megatron_config": off(None),
    **{k: off(None) for k in ("arrow_config", "kasa_config", "monteclora_config", "velora_config", "use_bdlora")},
}


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
