"""Layer kinds (deltatune.layers): a new kind is one registration, and every verb works on it."""
from __future__ import annotations

import pytest
import torch
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
    with pytest.raises(TypeError, match="cannot adapt TransposedLinear; adaptable: linear, conv1d, embedding"):
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
