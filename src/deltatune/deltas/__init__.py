"""Delta structures: one module per structure (see DESIGN.md's table)."""
from .base import Delta, FrozenWeight, NotLowRank, PeftTensors, Unbound, delta_from_spec, structure_class, structures
from .basis import NOLADelta, OrthogonalLowRankDelta, VeRADelta
from .dense import DenseDelta
from .full import FullDelta
from .gated import GatedSVDDelta
from .kind import KindDelta
from .lowrank import FactoredDelta, LowRankDelta, lowrank_apply
from .rotation import RotationDelta
from .sliced import SlicedDelta
from .sparse import SparseDelta

from .._modules import callable_module

callable_module(__name__, "deltatune.model:deltas")  # dt.deltas(model, name) and dt.deltas.LowRankDelta

__all__ = ["Delta", "DenseDelta", "FactoredDelta", "FullDelta", "GatedSVDDelta", "KindDelta", "LowRankDelta", "NOLADelta", "OrthogonalLowRankDelta",
           "FrozenWeight", "NotLowRank", "PeftTensors", "RotationDelta", "Unbound", "SlicedDelta", "SparseDelta", "VeRADelta", "delta_from_spec", "lowrank_apply", "structure_class",
           "structures"]
