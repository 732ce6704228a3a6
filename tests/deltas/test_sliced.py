"""The sliced delta: forward and gradients equal a masked dense reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_scale, grads_of, real_weight

import deltatune as dt
from deltatune.deltas.sliced import sliced_linear


# -- S2FT: the sliced delta -------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1])
def test_sliced_forward_and_gradients_equal_a_masked_dense_reference(minilm_dir, axis):
    W, b = real_weight(minilm_dir)  # 1536 x 384
    torch.manual_seed(0)
    idx = torch.randperm(W.shape[axis])[:40]
    d = dt.SlicedDelta(*W.shape, idx, axis)
    with torch.no_grad():
        d.D.normal_(0, 0.02)
    x = torch.randn(2, 7, W.shape[1], requires_grad=True)
    mask = torch.zeros_like(W)
    mask.index_fill_(axis, idx, 1.0)
    dense = d.dense().detach().requires_grad_(True)
    assert torch.equal(dense != 0, mask.bool() & (dense != 0)) and int((dense != 0).sum()) == d.D.numel()

    def reference():
        return F.linear(x, W + dense, b)
    gx_ref, gdense = grads_of(reference, x, dense)
    for path in ("fused", "generic"):
        def ours():
            if path == "fused":
                return sliced_linear(x.reshape(-1, W.shape[1]), W, b, d.D, d.idx, axis).view(2, 7, -1)
            return d.add_to(F.linear(x, W, b), x, inplace=False)
        torch.testing.assert_close(ours(), reference(), rtol=1e-5, atol=1e-5)
        gx, gD = grads_of(ours, x, d.D)
        assert_close_to_scale(gx, gx_ref)
        # the block's gradient is the dense gradient at the selected rows / columns (the masked dense gradient)
        assert_close_to_scale(gD, (gdense * mask).index_select(axis, idx))


def test_sliced_gradients_accumulate_over_backward_calls(minilm_dir):
    W, b = real_weight(minilm_dir)
    d = dt.SlicedDelta(*W.shape, torch.arange(5, 25), 1)
    xs = [torch.randn(9, W.shape[1]) for _ in range(2)]
    total = None
    for x in xs:
        sliced_linear(x, W, b, d.D, d.idx, 1).pow(2).sum().backward()
    total = d.D.grad.clone()
    parts = []
    for x in xs:
        d.D.grad = None
        sliced_linear(x, W, b, d.D, d.idx, 1).pow(2).sum().backward()
        parts.append(d.D.grad.clone())
    torch.testing.assert_close(total, parts[0] + parts[1])


def test_sliced_column_type_saves_only_the_selected_channels(minilm_dir):
    W, b = real_weight(minilm_dir, "encoder.layer.2.output.dense")  # 384 x 1536, column type as S2FT's down
    d = dt.SlicedDelta(*W.shape, torch.arange(0, 1536, 50), 1)
    x = torch.randn(64, W.shape[1], requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sliced_linear(x, W, b, d.D, d.idx, 1)
    activations = [t for t in saved if t.shape[0] == 64]
    assert [tuple(t.shape) for t in activations] == [(64, d.idx.numel())]
