"""Layer kinds (deltatune.layers): a new kind is one registration, and every verb works on it."""
from __future__ import annotations

import pytest
import torch
from helpers import changed_entries, randomize, state_snapshot
from torch import nn

import deltatune as dt
from deltatune import layers


class TransposedLinear(nn.Module):
    """A linear map that stores its weight as (in x out), like GPT-2's Conv1D, but a type deltatune does not know."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


def _transposed_kind():
    return layers.LayerKind("transposed", matches=lambda m: isinstance(m, TransposedLinear),
                            weight=lambda m: m.weight.t(), to_linear=lambda t: t.t(),
                            from_linear=lambda t, like: t.t())


def _net():
    torch.manual_seed(0)
    return nn.Sequential(TransposedLinear(12, 16), nn.Tanh(), nn.Linear(16, 4))


def test_an_unknown_layer_type_is_refused_naming_the_kinds():
    with pytest.raises(TypeError, match="cannot adapt TransposedLinear; adaptable: Linear, Conv1D, Embedding"):
        layers.kind_of(TransposedLinear(2, 3))
    with pytest.raises(ValueError, match="cannot adapt"):
        dt.attach(_net(), dt.LoRA(r=2, targets=["0"]))


@pytest.mark.parametrize("method", [dt.LoRA(r=3, targets=["0"]), dt.AdaLoRA(init_r=3, target_r=2, targets=["0"]),
                                    dt.OFT(block_size=4, targets=["0"]), dt.SpIEL(density=0.2, targets=["0"])],
                         ids=["lora", "adalora", "oft", "spiel"])
def test_a_registered_kind_takes_every_structure_and_merges_exactly(monkeypatch, method, tmp_path):
    monkeypatch.setattr(layers, "_KINDS", [*layers.kinds(), _transposed_kind()])
    net, x = _net(), torch.randn(5, 12)
    base = net(x).detach()
    W0 = net[0].weight.detach().clone()
    dt.attach(net, method)
    layer = net[0]
    assert isinstance(layer, dt.AdaptedLayer) and layer.kind == "transposed"
    with torch.no_grad():  # a non-zero update on every structure
        for p in layer.deltas["default"].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    # the delta acts on the weight in linear layout (out x in): dense update against the stored (in x out) weight
    dW = layer.deltas["default"].dense().detach()
    want = x @ (W0 + dW.t()) + layer.base.bias.detach()
    want = net[2](torch.tanh(want))
    torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-5)
    out = net(x).detach()
    dt.merge(net)
    torch.testing.assert_close(net(x), out, atol=1e-5, rtol=1e-5)
    dt.unmerge(net)
    assert torch.equal(net[0].base.weight, W0)  # exact: bit for bit
    dt.save(net, tmp_path / "a")
    fresh = _net()
    dt.load(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(x), out, atol=1e-6, rtol=1e-6)
    dt.unload(net)
    torch.testing.assert_close(net(x), base)


def test_embedding_and_conv1d_layers():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        y0 = model(ids).logits
    dt.attach(model, dt.LoRA(r=4, alpha=8, targets="all-linear"), name="c")
    assert "lm_head" not in dt.deltas(model, "c") and "transformer.h.0.attn.c_attn" in dt.deltas(model, "c")
    dt.attach(model, dt.LoRA(r=4, alpha=8, targets=["wpe"]), name="e", activate=False)
    dt.set_active(model, ["c", "e"])
    randomize(model, "c")
    randomize(model, "e")
    with torch.no_grad():
        y1 = model(ids).logits
        c_attn = model.transformer.h[0].attn.c_attn
        x = torch.randn(2, 3, 64)
        torch.testing.assert_close(c_attn(x), x @ c_attn.base.weight + c_attn.base.bias + x @ c_attn.deltas["c"].dense().T,
                                   atol=1e-5, rtol=0)
    assert not torch.allclose(y0, y1)
    dt.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, y1, atol=1e-4, rtol=0)
    dt.unmerge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, y1, atol=1e-4, rtol=0)
    plain = dt.unload(model)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, y0, atol=1e-5, rtol=0)


def test_conv1d_layers_unmerge_bit_exact():
    """GPT-2's Conv1D stores its weight transposed: the restore writes through the (out x in) view."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=100, n_positions=16)).eval()
    dt.attach(model, dt.LoRA(r=4, targets=["c_attn", "c_fc"]), name="a0")
    dt.attach(model, dt.OFT(block_size=16, targets=["c_proj"]), name="a1")
    with torch.no_grad():
        for name in ("a0", "a1"):
            for delta in dt.deltas(model, name).values():
                for p in delta.parameters():
                    p.add_(0.5 * torch.randn_like(p))
    dt.set_active(model, ["a0", "a1"])
    base = state_snapshot(model)
    for _ in range(10):
        dt.merge(model)
        assert changed_entries(model, base)
        dt.unmerge(model)
    assert changed_entries(model, base) == []
