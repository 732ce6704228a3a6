"""Importance scores: sensitivity EMAs, triplet scores, orthogonality gradients."""
from __future__ import annotations

import torch

from deltatune.budget import Sensitivity, orthogonality, orthogonality_grads, triplet_scores


def test_sensitivity_ema_and_triplet_scores_follow_the_definition():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    s = Sensitivity(beta1=0.5, beta2=0.5)
    ibar = ubar = torch.zeros(2)
    for g in (torch.tensor([3.0, 1.0]), torch.tensor([-1.0, 2.0])):
        w.grad = g
        s.update([w])
        i = (w.detach() * g).abs()
        ibar = 0.5 * ibar + 0.5 * i
        ubar = 0.5 * ubar + 0.5 * (i - ibar).abs()
    torch.testing.assert_close(s.score(w), ibar * ubar)
    sP, sl, sQ = torch.ones(4, 2), torch.tensor([1.0, 2.0]), torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    torch.testing.assert_close(triplet_scores(sP, sl, sQ), torch.tensor([1 + 2 + 1.0, 2 + 0 + 1.0]))


def test_orthogonality_gradients_equal_autograd():
    torch.manual_seed(0)
    Ps = [torch.randn(8, 3, requires_grad=True), torch.randn(5, 2, requires_grad=True)]
    Qs = [torch.randn(3, 6, requires_grad=True), torch.randn(2, 4, requires_grad=True)]
    R = orthogonality(Ps, Qs)
    ref = torch.autograd.grad(R, Ps + Qs)
    gP, gQ = orthogonality_grads(Ps, Qs)
    for a, b in zip(gP + gQ, ref):
        torch.testing.assert_close(a, b)
