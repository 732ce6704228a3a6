"""Combining adapters: ``dt.combine`` (:mod:`deltatune.combine.merge`) on top of merge arithmetic over task
vectors (:mod:`deltatune.combine.ops`)."""
from .merge import combine
from .ops import dare, dare_drop, disjoint_mean, elect_sign, magnitude_prune, task_arithmetic, ties

from .._modules import callable_module

callable_module(__name__, "deltatune.combine.merge:combine")  # dt.combine(model, ...) and dt.combine.ties

__all__ = ["combine", "dare", "dare_drop", "disjoint_mean", "elect_sign", "magnitude_prune", "task_arithmetic", "ties"]
