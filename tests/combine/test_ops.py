"""Merging operators by hand: task arithmetic, magnitude pruning, TIES, DARE."""
from __future__ import annotations

import pytest
import torch

from deltatune.combine import dare, dare_drop, disjoint_mean, elect_sign, magnitude_prune, task_arithmetic, ties


def test_task_arithmetic_and_magnitude_pruning_by_hand():
    a = torch.tensor([1.0, -2.0, 3.0, -4.0, 0.5])
    b = torch.tensor([-1.0, 1.0, 1.0, 1.0, 1.0])
    torch.testing.assert_close(task_arithmetic([a, b], [0.5, -2.0]), torch.tensor([2.5, -3.0, -0.5, -4.0, -1.75]))
    torch.testing.assert_close(magnitude_prune(a, 0.4), torch.tensor([0.0, 0.0, 3.0, -4.0, 0.0]))
    torch.testing.assert_close(magnitude_prune(a, 1.0), a)
    assert int((magnitude_prune(torch.arange(10.0), 0.2) != 0).sum()) == 2  # no float off-by-one
    with pytest.raises(ValueError, match="density"):
        magnitude_prune(a, 0.0)
    with pytest.raises(ValueError, match="3 weights for 2"):
        task_arithmetic([a, b], [1, 2, 3])


def test_ties_trims_elects_signs_and_takes_the_disjoint_mean():
    t1 = torch.tensor([4.0, -1.0, 2.0, 0.1])
    t2 = torch.tensor([-1.0, -3.0, 2.0, -0.2])
    t3 = torch.tensor([-1.0, 2.0, -6.0, 0.3])
    # density 0.75 keeps 3 of 4 entries per task: t1 drops 0.1, t2 drops -0.2, t3 drops 0.3
    trimmed = [magnitude_prune(t, 0.75) for t in (t1, t2, t3)]
    torch.testing.assert_close(trimmed[0], torch.tensor([4.0, -1.0, 2.0, 0.0]))
    sign = elect_sign(trimmed)  # sums: 2, -2, -2, 0
    torch.testing.assert_close(sign, torch.tensor([1.0, -1.0, -1.0, 0.0]))
    # entry 0: only t1 agrees -> 4; entry 1: t1, t2 agree -> -2; entry 2: only t3 -> -6; entry 3: nobody -> 0
    torch.testing.assert_close(ties([t1, t2, t3], density=0.75), torch.tensor([4.0, -2.0, -6.0, 0.0]))
    # weights enter the election and the mean; with t2 weighted 3 the sums are 0, -8, 2, 0: entry 0 has no sign,
    # entry 1 is (-1 - 9) / (1 + 3), entry 2 flips to the positive side, (2 + 6) / (1 + 3)
    torch.testing.assert_close(ties([t1, t2, t3], [1.0, 3.0, 1.0], density=0.75),
                               torch.tensor([0.0, -2.5, 2.0, 0.0]))
    torch.testing.assert_close(disjoint_mean([t1, t2], torch.tensor([1.0, -1.0, 1.0, 1.0]), [2.0, 1.0]),
                               torch.tensor([4.0, (2 * -1.0 + 1 * -3.0) / 3, 2.0, 0.1]))


def test_dare_drops_at_the_given_rate_rescales_and_combines():
    tau = torch.ones(100_000)
    g = torch.Generator().manual_seed(0)
    dropped = dare_drop(tau, 0.25, g)
    kept = dropped != 0
    assert abs(float(kept.float().mean()) - 0.25) < 0.01
    assert torch.all(dropped[kept] == 4.0)  # survivors rescaled by 1 / density
    assert abs(float(dropped.mean()) - 1.0) < 0.05  # unbiased
    a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1.0, 2.0, -1.0])
    torch.testing.assert_close(dare([a, b], [1.0, 0.5], density=1.0), a + 0.5 * b)  # density 1 keeps everything
    torch.testing.assert_close(dare([a, b], density=1.0, consensus="ties"), torch.tensor([1.0, 0.0, 3.0]))
    same = [dare([a, b], density=0.5, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    torch.testing.assert_close(same[0], same[1])
    with pytest.raises(ValueError, match="consensus"):
        dare([a, b], consensus="mean")
