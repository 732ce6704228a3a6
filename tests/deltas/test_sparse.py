"""The sparse delta: forward, gradients and gradient observer equal a dense reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import assert_close_to_scale, grads_of, real_weight

import deltatune as dt
from deltatune.deltas.sparse import sparse_linear


# -- SpIEL ------------------------------------------------------------------------------------------------------
def test_sparse_forward_gradients_and_observer_equal_a_dense_reference(minilm_dir):
    W, b = real_weight(minilm_dir)
    torch.manual_seed(0)
    idx = torch.randperm(W.numel())[:3000]
    d = dt.SparseDelta(*W.shape, idx)
    with torch.no_grad():
        d.values.normal_(0, 0.05)
    x = torch.randn(11, W.shape[1], requires_grad=True)
    dense = d.dense().detach().requires_grad_(True)
    gx_ref, gdense = grads_of(lambda: F.linear(x, W + dense, b), x, dense)
    seen = []
    for path in ("fused", "generic"):
        d.observer = seen.append
        def ours():
            if path == "fused":
                return sparse_linear(x, W, b, d.values, d.idx, d.observer)
            return d.add_to(F.linear(x, W, b), x, inplace=False)
        torch.testing.assert_close(ours(), F.linear(x, W + dense, b), rtol=1e-5, atol=1e-5)
        seen.clear()
        gx, gv = grads_of(ours, x, d.values)
        assert_close_to_scale(gx, gx_ref)
        assert_close_to_scale(gv, gdense.reshape(-1)[idx])  # only the active entries
        assert len(seen) == 1
        assert_close_to_scale(seen[0], gdense)  # the observer sees the dense gradient
