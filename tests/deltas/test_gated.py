"""The gated-SVD delta: forward, gradients, merge and masks follow the formula."""
from __future__ import annotations

import torch
from helpers import random_gated

import deltatune as dt


# -- the delta ------------------------------------------------------------------------------------------------
def test_gated_delta_forward_grads_and_merge_follow_the_formula():
    torch.manual_seed(0)
    d = random_gated(12, 10, 5, 0.7)
    d.set_mask(torch.tensor([1.0, 0, 1, 1, 0]))
    W, b = torch.randn(12, 10), torch.randn(12)
    x = torch.randn(7, 10, requires_grad=True)
    out = d.fuse(x, W, b)  # the fused frozen-linear + delta kernel
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, d.P, d.lam, d.Q], g)
    P, lam, Q = (t.detach().clone().requires_grad_() for t in (d.P, d.lam, d.Q))
    x2 = x.detach().clone().requires_grad_()
    dense = 0.7 * P @ torch.diag(lam * d.mask) @ Q
    ref = x2 @ (W + dense).t() + b
    ref_grads = torch.autograd.grad(ref, [x2, P, lam, Q], g)
    torch.testing.assert_close(out, ref)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r)
    assert grads[2][1] == 0 and grads[2][0] != 0  # a masked gate gets no gradient
    torch.testing.assert_close(d.dense(), dense.detach())
    assert d.live().tolist() == [True, False, True, True, False]
    B, A, s = d.lowrank()  # export: gates folded into B, masked components dropped
    assert A.shape == (3, 10) and s == 0.7
    torch.testing.assert_close(s * B @ A, dense.detach())


def test_mask_survives_load_state_dict():
    d = dt.GatedSVDDelta(4, 3, 2, scale=1.0)
    with torch.no_grad():
        d.P.fill_(1.0), d.Q.fill_(1.0), d.lam.fill_(1.0)
    state = {k: v.clone() for k, v in d.state_dict().items()}
    state["mask"] = torch.tensor([1.0, 0.0])
    d.load_state_dict(state)
    assert d.live().tolist() == [True, False]
    torch.testing.assert_close(d.dense(), torch.ones(4, 3))  # one live component of P Q
