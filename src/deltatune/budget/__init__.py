"""The budget engine shared by the adaptive-rank methods (AdaLoRA, IncreLoRA, SoRA; later the sparse ones).

- :mod:`.importance`: sensitivity ``|w * dL/dw|`` smoothed by an EMA and weighted by its uncertainty, per
  parameter entry, and reduced to one score per component (triplet) or per module;
- :mod:`.schedule`: budget over time (AdaLoRA's cubic schedule);
- :mod:`.allocate`: global allocation by threshold over all adapted matrices, top-k module choice;
- :mod:`.resize`: physically removing or adding components, with the optimizer state kept in step;
- :mod:`.sync`: identical decisions on every ``torch.distributed`` rank.
"""
from .allocate import threshold_masks, top_modules
from .importance import Sensitivity, orthogonality, orthogonality_grad, orthogonality_grads, triplet_scores
from .resize import grow_components_, keep_components_
from .schedule import cubic_budget, masking_phase
from .sync import broadcast_

__all__ = ["Sensitivity", "broadcast_", "cubic_budget", "grow_components_", "keep_components_", "masking_phase",
           "orthogonality", "orthogonality_grad", "orthogonality_grads", "threshold_masks", "top_modules",
           "triplet_scores"]
