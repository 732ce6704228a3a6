"""The adaptive-rank methods, as one import (kept for code written before the split): the shared gated-SVD
machinery is :mod:`deltatune.methods.gated`, the methods are :mod:`~deltatune.methods.adalora`,
:mod:`~deltatune.methods.increlora` and :mod:`~deltatune.methods.sora`."""
from .adalora import SHRINK, AdaLoRA, AdaLoRAController
from .gated import INIT_STD, GatedController, gated_deltas, svd_triplets_init
from .increlora import IncreLoRA, IncreLoRAController
from .sora import SoRA, SoRAController, soft_threshold_

__all__ = ["AdaLoRA", "AdaLoRAController", "GatedController", "INIT_STD", "IncreLoRA", "IncreLoRAController", "SHRINK",
           "SoRA", "SoRAController", "gated_deltas", "soft_threshold_", "svd_triplets_init"]
