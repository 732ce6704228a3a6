"""Combining adapters: merge arithmetic over task vectors (:mod:`deltatune.combine.ops`)."""
from .ops import dare, dare_drop, disjoint_mean, elect_sign, magnitude_prune, task_arithmetic, ties

__all__ = ["dare", "dare_drop", "disjoint_mean", "elect_sign", "magnitude_prune", "task_arithmetic", "ties"]
