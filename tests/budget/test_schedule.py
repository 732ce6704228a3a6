"""Budget schedules (cubic)."""
from __future__ import annotations

from deltatune.budget import cubic_budget, masking_phase


# -- the engine -------------------------------------------------------------------------------------------------
def test_cubic_schedule_values():
    # b_init 24, b_T 8, t_init 10, t_final 20, T 110: the cubic runs over steps 10..90
    args = dict(b_init=24, b_target=8, t_init=10, t_final=20, total=110)
    assert cubic_budget(0, **args) == 24 and cubic_budget(10, **args) == 24
    assert cubic_budget(30, **args) == int(8 + 16 * (1 - 20 / 80) ** 3) == 14
    assert cubic_budget(50, **args) == int(8 + 16 * 0.5 ** 3) == 10
    assert cubic_budget(90, **args) == 8 and cubic_budget(91, **args) == 8 and cubic_budget(109, **args) == 8
    budgets = [cubic_budget(t, **args) for t in range(110)]
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))  # never grows
    assert [masking_phase(t, 10, 20, 110) for t in (10, 11, 90, 91)] == ["warmup", "budgeting", "budgeting", "final"]
