"""Budget schedules.

AdaLoRA (Zhang et al., 2023), with ``b_init = sum of init_r`` and ``b_T = target_r * n_matrices`` over ``T``
optimizer steps (``t`` counted from 0)::

    t <= t_init                 b(t) = b_init                                          warm-up, no masking
    t_init < t <= T - t_final   b(t) = b_T + (b_init - b_T) (1 - (t - t_init) / (T - t_final - t_init))^3
                                (cast to int); mask when t % delta_t == 0
    t > T - t_final             b(t) = b_T                                             final pattern, frozen
"""
from __future__ import annotations

WARMUP, BUDGETING, FINAL = "warmup", "budgeting", "final"


def cubic_budget(t: int, b_init: int, b_target: int, t_init: int, t_final: int, total: int) -> int:
    """AdaLoRA's budget at step ``t``."""
    if t <= t_init:
        return b_init
    if t > total - t_final:
        return b_target
    span = max(1, total - t_final - t_init)
    mul = 1.0 - (t - t_init) / span
    return int(b_target + (b_init - b_target) * mul ** 3)


def masking_phase(t: int, t_init: int, t_final: int, total: int) -> str:
    """``"warmup"``, ``"budgeting"`` or ``"final"`` (see the module docstring)."""
    if t <= t_init:
        return WARMUP
    if t <= total - t_final:
        return BUDGETING
    return FINAL
