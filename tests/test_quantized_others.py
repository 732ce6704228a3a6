"""Adapters on torchao int8 weight-only, HQQ 4-bit and optimum-quanto int8 linears on CPU (each skipped when its
package is absent): identity at init, LoRA trains, the quantized base is untouched, merging is refused, and the
saved adapter loads onto another quantized copy with the same outputs."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))


def torchao_model():
    ao = pytest.importorskip("torchao.quantization")
    model = mlp()
    ao.quantize_(model, ao.Int8WeightOnlyConfig())
    return model


def hqq_model():
    pytest.importorskip("hqq")
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    model = mlp()
    for i in (0, 2):
        model[i] = HQQLinear(model[i], BaseQuantizeConfig(nbits=4, group_size=16), compute_dtype=torch.float32,
                             device="cpu")
    return model


def quanto_model():
    quanto = pytest.importorskip("optimum.quanto")
    model = mlp()
    quanto.quantize(model, weights=quanto.qint8)
    quanto.freeze(model)
    return model


BUILDERS = {"torchao": (torchao_model, "torchao_linear"), "hqq": (hqq_model, "hqq_linear"),
            "quanto": (quanto_model, "quanto_qlinear")}


@pytest.mark.parametrize("package", list(BUILDERS))
def test_lora_trains_on_the_quantized_base_and_leaves_it_untouched(package, tmp_path):
    build, kind = BUILDERS[package]
    model = build()
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 8, (16,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
    dt.attach(model, dt.LoRA(r=4, targets=["0", "2"]), name="a")
    layers = dict(dt.model.adapted_layers(model))
    assert {layer.layer_kind.name for layer in layers.values()} == {kind}
    base = {n: layer.linear_weight().detach().clone() for n, layer in layers.items()}
    W0 = mlp()[0].weight.detach()
    assert 0 < float((base["0"] - W0).norm() / W0.norm()) < 0.15  # the dequantized weight, not garbage
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)  # identity at init
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(layers[n].linear_weight(), w) for n, w in base.items())  # the base is untouched
    with pytest.raises(ValueError, match="quantized weight"):
        dt.merge(model)
    dt.save(model, tmp_path / "a")
    other = dt.load(build(), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x))
