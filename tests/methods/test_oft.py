"""OFT: orthogonal block rotations, PEFT parity, the radius constraint, Conv1D."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import logits, make_minilm, set_random_values, sst2_batches, train_loop

import deltatune as dt
from deltatune.deltas.rotation import cayley, rotate, skew


Q_NAME = "bert.encoder.layer.0.attention.self.query"


# -- OFT -------------------------------------------------------------------------------------------------------
def test_oft_rotation_is_orthogonal_fused_gradients_match_autograd_and_merge_is_exact(minilm_dir, minilm_batch):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(12, 32 * 31 // 2, generator=g) * 0.1
    rows, cols = torch.triu_indices(32, 32, 1)
    Q = skew(q, rows, cols, 32)
    R = cayley(Q)
    eye = torch.eye(32).expand_as(R)
    torch.testing.assert_close(R.transpose(1, 2) @ R, eye, rtol=0, atol=1e-5)
    small = Q * 0.1  # spectral radius about 0.1: the series converges to the exact transform
    torch.testing.assert_close(cayley(small, "neumann", 12), cayley(small), rtol=0, atol=1e-5)

    model = make_minilm(minilm_dir)
    base = logits(model, minilm_batch)
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    dt.attach(model, dt.OFT(block_size=32, targets=["query", "value", "intermediate.dense"]))
    torch.testing.assert_close(logits(model, minilm_batch), base)  # R = I at init
    set_random_values(model, "default", std=0.05)
    out = logits(model, minilm_batch)
    # fused node vs plain autograd for one layer: output, input and parameter gradients
    d = dt.deltas(model, "default")[Q_NAME]
    W, b = d.base_weight()
    x = torch.randn(40, 384, generator=g, requires_grad=True)
    fused_out = d.replace(x)
    gx, gq = torch.autograd.grad(fused_out.pow(2).sum(), (x, d.q))
    ref_out = F.linear(rotate(x, d.rotation()), W, b)
    rx, rq = torch.autograd.grad(ref_out.pow(2).sum(), (x, d.q))
    torch.testing.assert_close(fused_out, ref_out)
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gq, rq, rtol=1e-4, atol=1e-3)
    # merge is multiplicative and exact, unmerge restores the weights
    dt.merge(model)
    torch.testing.assert_close(logits(model, minilm_batch), out, rtol=1e-4, atol=1e-4)
    Wm = model.bert.get_submodule(Q_NAME.removeprefix("bert.")).weight
    R = d.rotation().detach()
    torch.testing.assert_close(Wm.detach(), rotate(W0[Q_NAME + ".weight"], R.transpose(1, 2)))  # W' = W R^T
    dt.unmerge(model)
    for n, p in dt.unload(model).named_parameters():
        torch.testing.assert_close(p, W0[n], rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["neumann", "exact"])
def test_oft_forward_equals_peft_oft_for_identical_parameters(minilm_dir, minilm_batch, variant):
    from peft import OFTConfig, get_peft_model

    cfg = OFTConfig(oft_block_size=32, r=0, target_modules=["query", "value", "dense"],
                    use_cayley_neumann=variant == "neumann", num_cayley_neumann_terms=5, init_weights=True)
    peft = get_peft_model(make_minilm(minilm_dir), cfg)
    ours = dt.attach(make_minilm(minilm_dir), dt.OFT(block_size=32, cayley=variant, terms=5,
                                                      targets=["query", "value", "dense"]))
    g = torch.Generator().manual_seed(2)
    sign = 1.0 if variant == "neumann" else -1.0  # PEFT's exact variant is (I - Q)(I + Q)^-1: ours with q -> -q
    with torch.no_grad():
        for name, d in dt.deltas(ours, "default").items():
            theirs = peft.base_model.model.get_submodule(name).oft_R["default"].weight
            d.q.copy_(torch.randn(d.q.shape, generator=g) * 0.02)
            theirs.copy_(sign * d.q)
    torch.testing.assert_close(logits(ours, minilm_batch), logits(peft, minilm_batch), rtol=1e-4, atol=1e-5)


def test_oft_radius_keeps_every_block_inside_its_ball(minilm_dir, sst2_rows):
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.OFT(block_size=32, radius=1e-2, targets=["query", "value"], modules_to_save=["classifier"]))
    train_loop(model, sst2_batches(minilm_dir, sst2_rows, n=2), steps=3, lr=0.1)
    rotations = [d for d in dt.deltas(model, "default").values() if isinstance(d, dt.RotationDelta)]
    assert len(rotations) == 12  # query and value in each of the 6 blocks: the checks below are not vacuous
    for d in rotations:
        limit = 1e-2 / d.blocks ** 0.5
        norms = d.skew().detach().flatten(1).norm(dim=1)
        assert float(norms.max()) <= limit * (1 + 1e-4)
        assert float(norms.min()) > 0.9 * limit  # lr 0.1 pushes every block to the boundary
        assert float(norms.max()) >= limit * (1 - 1e-4)  # the constraint bites: blocks were projected onto it
        R = cayley(d.skew().detach())
        assert float((R - torch.eye(R.shape[-1])).abs().max()) > 1e-4  # real rotations, not the identity


def test_oft_on_conv1d_follows_the_weight_through_dtype_casts():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)).eval()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        base = gpt(ids).logits
        dt.attach(gpt, dt.OFT(block_size=16, targets=["c_attn", "c_fc"]))
        assert torch.equal(gpt(ids).logits, base)
        set_random_values(gpt, "default", std=0.05)
        out = gpt(ids).logits
        assert (out - base).abs().max() > 1e-3
        dt.merge(gpt)  # Conv1D stores W^T: the merge writes through the transposed view
        torch.testing.assert_close(gpt(ids).logits, out, rtol=1e-4, atol=1e-4)
        dt.unmerge(gpt)
        gpt.double()  # new parameter tensors: the rotation reads the layer's current weight, not a stale one
        torch.testing.assert_close(gpt(ids).logits.float(), out, rtol=1e-4, atol=1e-4)
