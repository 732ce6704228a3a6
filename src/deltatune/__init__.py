"""deltatune: fine-tune pretrained models with structured weight deltas.

    import deltatune as dt
    dt.attach(model, dt.LoRA(r=8, alpha=16, targets="all-linear"), name="sst2")
    ...train...
    dt.save(model, "out/sst2")
"""
from ._version import __version__  # noqa: E402,F401
from . import quantized  # noqa: E402,F401  (layer kinds of bitsandbytes' 4-bit / 8-bit linears)

from .deltas import (  # noqa: E402
    Delta, FullDelta, GatedSVDDelta, KindDelta, LowRankDelta, NOLADelta, OrthogonalLowRankDelta, RotationDelta, SlicedDelta,
    SparseDelta, VeRADelta)
from .methods import (  # noqa: E402
    KIND, LTSFT, NOLA, OFT, S2FT, SORSA, AdaLoRA, Controller, IncreLoRA, LoRA, Method, MiLoRA, OLoRA, OrthogonalAdaptation,
    PiSSA, SoRA, SpIEL, StepInfo, VeRA, CorDA, EVA)
from .model import (  # noqa: E402
    AdaptedLayer,
    active_adapters,
    adapters,
    attach,
    delete,
    disabled,
    merge,
    print_trainable_parameters,
    set_active,
    trainable_parameters,
    unload,
    unmerge,
)
from . import conditioning  # noqa: E402,F401  (per-sample conditions from the batch)
from .conditioning import set_condition  # noqa: E402
from .learngenes import kind_recombine, kind_select, kind_transfer  # noqa: E402
from .control import after_backward, begin, controller, controller_metrics, step  # noqa: E402
from .calibration import calibrate  # noqa: E402
# combine, compress, deltas, extract, interference: modules that are also callable as their function (see _modules),
# so dt.combine(model, ...) and dt.combine.ties / import deltatune.combine.ops both work
from . import combine, compress, deltas, extract, interference  # noqa: E402
from .compress import load_compressed  # noqa: E402
from .io import load, save  # noqa: E402
from .serving import adapter_rows, set_serving  # noqa: E402
from . import hf  # noqa: E402,F401  (registers save_pretrained on adapted transformers models)

__all__ = [
    "AdaLoRA", "AdaptedLayer", "KIND", "KindDelta", "kind_recombine", "kind_select", "kind_transfer", "set_condition", "Controller", "Delta", "FullDelta", "GatedSVDDelta", "IncreLoRA", "LTSFT", "LoRA",
    "LowRankDelta", "Method", "MiLoRA", "NOLA", "NOLADelta", "OFT", "OLoRA", "OrthogonalAdaptation",
    "OrthogonalLowRankDelta", "PiSSA", "CorDA", "EVA", "RotationDelta", "S2FT", "SORSA", "SlicedDelta", "SoRA", "SparseDelta", "SpIEL", "StepInfo",
    "VeRA", "VeRADelta", "active_adapters", "adapter_rows", "adapters", "after_backward", "attach", "calibrate", "combine", "compress", "interference", "begin", "controller", "controller_metrics", "deltas", "delete", "disabled", "extract", "load", "load_compressed", "merge", "print_trainable_parameters", "save", "set_active", "set_serving",
    "step", "trainable_parameters", "unload", "unmerge",
]
