"""Budget allocation: global thresholds."""
from __future__ import annotations

import torch

from deltatune.budget import threshold_masks


def test_threshold_allocation_is_global_and_exact():
    scores = [torch.tensor([0.9, 0.1, 0.5]), torch.tensor([0.3, 0.8]), torch.tensor([0.05])]
    keep = threshold_masks(scores, 3)
    assert [k.tolist() for k in keep] == [[True, False, True], [False, True], [False]]
    assert sum(int(k.sum()) for k in threshold_masks(scores, 0)) == 0
    assert all(bool(k.all()) for k in threshold_masks(scores, 6))
