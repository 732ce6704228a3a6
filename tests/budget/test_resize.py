"""Resizing gated deltas: outputs, gradients and optimizer state survive shrink and grow."""
from __future__ import annotations

import pytest
import torch
from helpers import random_gated

from deltatune.budget import keep_components_


def test_resize_keeps_outputs_gradients_and_optimizer_state():
    torch.manual_seed(0)
    d = random_gated(6, 5, 4, 1.0)
    x = torch.randn(3, 5)
    opt = torch.optim.Adam(d.parameters(), lr=0.1)
    d(x).sum().backward()
    opt.step()
    with torch.no_grad():
        d.lam[2] = 0  # a pruned component
    before = d(x).detach()
    state_Q = opt.state[d.Q]["exp_avg"].clone()
    old_Q = d.Q
    ema = {d.Q: torch.arange(20.0).view(4, 5)}
    keep_components_(d, torch.tensor([0, 1, 3]), opt, [ema])
    assert d.r == 3 and d.Q is not old_Q
    torch.testing.assert_close(d(x), before)  # the dropped component had lam = 0
    assert any(q is d.Q for g in opt.param_groups for q in g["params"])
    assert not any(q is old_Q for g in opt.param_groups for q in g["params"])
    torch.testing.assert_close(opt.state[d.Q]["exp_avg"], state_Q[[0, 1, 3]])
    torch.testing.assert_close(ema[d.Q], torch.arange(20.0).view(4, 5)[[0, 1, 3]])
    assert d.Q.grad.shape == (3, 5)
    d(x).sum().backward()  # the optimizer keeps working on the new tensors
    q0 = d.Q.detach().clone()
    opt.step()
    assert not torch.equal(q0, d.Q)


def test_growing_pads_state_and_unresizable_state_is_refused():
    from deltatune.budget import grow_components_

    torch.manual_seed(0)
    d = random_gated(6, 5, 2, 1.0)
    opt = torch.optim.AdamW(d.parameters(), lr=0.1)
    x = torch.randn(3, 5)
    d(x).sum().backward()
    opt.step()
    v = opt.state[d.Q]["exp_avg_sq"].clone()
    grow_components_(d, 3, opt)
    assert d.r == 5 and d.Q.grad.shape == (5, 5) and d.Q.grad[2:].abs().sum() == 0
    assert torch.equal(opt.state[d.Q]["exp_avg_sq"][:2], v)
    torch.testing.assert_close(opt.state[d.Q]["exp_avg_sq"][2:], torch.full((3, 5), float(v.mean())))
    assert opt.state[d.Q]["exp_avg"][2:].abs().sum() == 0
    d(x).sum().backward()
    opt.step()  # trains old and new entries alike

    factored = torch.optim.Adafactor(d.parameters(), lr=0.01)  # row/column second moments: cannot be sliced
    d(x).sum().backward()
    factored.step()
    P = d.P
    with pytest.raises(ValueError, match="factored or blockwise"):
        keep_components_(d, torch.tensor([0, 1]), factored)
    assert d.P is P and d.r == 5  # refused before anything changed
