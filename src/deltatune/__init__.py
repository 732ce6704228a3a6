"""deltatune: fine-tune pretrained models with structured weight deltas.

    import deltatune as dt
    dt.attach(model, dt.LoRA(r=8, alpha=16, targets="all-linear"), name="sst2")
    ...train...
    dt.save(model, "out/sst2")
"""
__version__ = "0.1.0"

from .deltas import Delta, FullDelta, GatedSVDDelta, LowRankDelta, SlicedDelta, SparseDelta  # noqa: E402
from .methods import (  # noqa: E402
    LTSFT, S2FT, AdaLoRA, Controller, IncreLoRA, LoRA, Method, MiLoRA, OLoRA, PiSSA, SoRA, SpIEL)
from .model import (  # noqa: E402
    AdaptedLayer,
    active_adapters,
    adapters,
    after_backward,
    attach,
    begin,
    controller_metrics,
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
    "AdaLoRA", "AdaptedLayer", "Controller", "Delta", "FullDelta", "GatedSVDDelta", "IncreLoRA", "LTSFT", "LoRA",
    "LowRankDelta", "Method", "MiLoRA", "OLoRA", "PiSSA", "S2FT", "SlicedDelta", "SoRA", "SparseDelta", "SpIEL", "active_adapters", "adapters", "after_backward",
    "attach", "begin", "controller_metrics", "deltas", "delete", "disabled", "load", "merge", "save", "set_active",
    "step", "trainable_parameters", "unload", "unmerge",
]
