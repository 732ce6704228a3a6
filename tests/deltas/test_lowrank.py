"""The hand-written low-rank autograd nodes: exact gradients, and the fused path equals the generic one."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import make_minilm, randomize

import deltatune as dt
from deltatune.deltas.lowrank import lowrank_apply, lowrank_linear


def _double(*shape, grad=True):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=grad)


@pytest.mark.parametrize("inplace", [True, False], ids=["in-place", "out-of-place"])
def test_lowrank_apply_gradients(inplace):
    torch.manual_seed(0)
    x, A, B, W = _double(2, 3, 5), _double(4, 5), _double(6, 4), _double(6, 5)

    def f(x, A, B, W):
        return lowrank_apply(F.linear(x.reshape(-1, 5), W), x, A, B, 0.7, inplace=inplace)

    assert torch.autograd.gradcheck(f, (x, A, B, W))
    ref = F.linear(x, W) + 0.7 * (x @ A.t()) @ B.t()
    base = F.linear(x.reshape(-1, 5), W).detach()
    out = lowrank_apply(base, x.detach(), A.detach(), B.detach(), 0.7, inplace=inplace)
    torch.testing.assert_close(out.reshape(ref.shape), ref.detach())
    assert (out.data_ptr() == base.data_ptr()) == inplace  # written into the base output only when allowed
    view = F.linear(x.reshape(-1, 5), W).detach()[:, :6]  # a view of another tensor is never written into
    assert lowrank_apply(view, x.detach(), A.detach(), B.detach(), 0.7).data_ptr() != view.data_ptr()


@pytest.mark.parametrize("dropout", [False, True])
def test_lowrank_linear_gradients(dropout):
    torch.manual_seed(0)
    x, A, B = _double(6, 5), _double(4, 5), _double(7, 4)
    W, b = _double(7, 5, grad=False), _double(7, grad=False)
    mask = (torch.rand(6, 5) > 0.5).double() * 2

    def f(x, A, B):
        xd = x * mask if dropout else x
        return lowrank_linear(x, xd, W, b, A, B, 0.3)

    assert torch.autograd.gradcheck(f, (x, A, B))
    xd = x * mask if dropout else x
    torch.testing.assert_close(f(x, A, B), x @ W.t() + b + 0.3 * (xd @ A.t()) @ B.t())


def _loss_and_grads(model, batch, seed):
    torch.manual_seed(seed)  # the same dropout masks in both runs
    model.train()
    out = model(**batch)
    loss = F.cross_entropy(out.logits, torch.arange(out.logits.shape[0]) % 2)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_fused_layers_equal_the_generic_path(minilm_dir, minilm_batch):
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.LoRA(r=4, alpha=8, dropout=0.1, targets="all-linear", modules_to_save=["classifier"]))
    randomize(model, "default")
    query = model.bert.encoder.layer[0].attention.self.query
    with torch.enable_grad():
        node = query(torch.randn(2, 3, 384)).grad_fn.next_functions[0][0]  # under the final reshape
        assert "LowRankLinear" in type(node).__name__  # the fused node runs
    fused = _loss_and_grads(model, minilm_batch, seed=3)

    calls = []
    for d in dt.deltas(model, "default").values():  # force the generic base(x) + add_to path
        d.fuse = lambda *args, _calls=calls: _calls.append(1)
    generic = _loss_and_grads(model, minilm_batch, seed=3)
    assert len(calls) == 6 * 6 + 1  # every adapted linear layer (6 per block, and the pooler) was offered it
    torch.testing.assert_close(fused[0], generic[0], atol=1e-6, rtol=0)
    assert fused[1].keys() == generic[1].keys()
    for name in fused[1]:
        torch.testing.assert_close(fused[1][name], generic[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_hooked_base_layers_are_called_as_they_are(minilm_dir, minilm_batch):
    model = make_minilm(minilm_dir).eval()
    dt.attach(model, dt.LoRA(r=4, targets=["query"]))
    randomize(model, "default")
    with torch.no_grad():
        y = model(**minilm_batch).logits
    layer = model.bert.encoder.layer[1].attention.self.query  # its input requires grad (layer 0 is adapted)
    seen, grads = [], []
    layer.base.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].shape, out, out.clone())))
    layer.base.register_full_backward_hook(lambda mod, gin, gout: grads.append(gout[0].shape))
    out = model(**minilm_batch).logits
    torch.testing.assert_close(out, y, atol=1e-5, rtol=0)
    (x_shape, hooked_out, copy), = seen
    assert len(x_shape) == 3 and hooked_out.dim() == 3  # the base sees the caller's shapes
    assert torch.equal(hooked_out, copy)  # and its output is not overwritten by the adapter's update
    out.sum().backward()
    assert len(grads) == 1 and len(grads[0]) == 3  # backward hooks fire too (accelerate, user hooks)


def _graph_nodes(out: torch.Tensor) -> list[str]:
    """The type names of every autograd node ``out`` was computed through."""
    seen, todo, names = set(), [out.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


def test_autocast_runs_the_fused_node_in_bf16(minilm_dir, minilm_batch):
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.LoRA(r=4, alpha=8, targets="all-linear", modules_to_save=["classifier"]))
    randomize(model, "default")
    with torch.no_grad():
        ref = model(**minilm_batch).logits
    assert any("LowRankLinear" in n for n in _graph_nodes(model(**minilm_batch).logits))  # fused without autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**minilm_batch).logits
    nodes = _graph_nodes(out)
    assert any("LowRankLinear" in n for n in nodes)  # the fused node runs under autocast too (in bf16)
    assert any("ToCopy" in n for n in nodes)  # ... on bf16 copies of the float32 factors
    out.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(out.float(), ref, atol=0.15, rtol=0.05)  # bf16 rounding, same function
