"""deltatune: fine-tune pretrained models with structured weight deltas.

    import deltatune as dt
    dt.attach(model, dt.LoRA(r=8, alpha=16, targets="all-linear"), name="sst2")
    ...train...
    dt.save(model, "out/sst2")
"""
__version__ = "0.1.0"

from .deltas import Delta, FullDelta, LowRankDelta  # noqa: E402
from .methods import Controller, LoRA, Method, MiLoRA, OLoRA, PiSSA  # noqa: E402
from .model import (  # noqa: E402
    AdaptedLayer,
    active_adapters,
    adapters,
    after_backward,
    attach,
    deltas,
    delete,
    disabled,
    merge,
    set_active,
    step,
    trainable_parameters,
    unload,
    unmerge,
)
from .io import load, save  # noqa: E402

__all__ = [
    "AdaptedLayer", "Controller", "Delta", "FullDelta", "LoRA", "LowRankDelta", "Method", "MiLoRA", "OLoRA",
    "PiSSA", "active_adapters", "adapters", "after_backward", "attach", "deltas", "delete", "disabled", "load",
    "merge", "save", "set_active", "step", "trainable_parameters", "unload", "unmerge",
]
