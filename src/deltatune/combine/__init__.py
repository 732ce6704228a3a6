"""Combining adapters: ``dt.combine`` (:mod:`deltatune.combine.merge`) on top of merge arithmetic over task
vectors (:mod:`deltatune.combine.ops`)."""
from .merge import combine
from .ops import dare, dare_drop, disjoint_mean, elect_sign, magnitude_prune, task_arithmetic, ties

__all__ = ["combine", "dare", "dare_drop", "disjoint_mean", "elect_sign", "magnitude_prune", "task_arithmetic", "ties"]
