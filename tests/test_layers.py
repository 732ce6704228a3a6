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
    with pytest.raises(TypeError, match="cannot adapt TransposedLinear; adaptable: .*Linear, Conv1D, Embedding, Conv1d"):
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


# -- convolutions ---------------------------------------------------------------------------------------------------
CONVS = {
    "conv1d-circular-same": lambda: nn.Conv1d(4, 8, 5, padding="same", padding_mode="circular"),
    "conv2d-stride-reflect-dilated-grouped": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, padding_mode="reflect",
                                                               dilation=2, groups=2),
    "conv2d-replicate-nobias": lambda: nn.Conv2d(4, 5, (3, 1), padding=(1, 0), padding_mode="replicate", bias=False),
    "conv3d-grouped": lambda: nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1), groups=2),
    "conv2d-strided": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1),
    "conv2d-pointwise": lambda: nn.Conv2d(4, 6, 1),  # the fused LoCon node runs it as matrix products
}
CONV_METHODS = {
    "lora": lambda: dt.LoRA(r=2, targets=["0"]),
    "lora-dropout": lambda: dt.LoRA(r=2, dropout=0.1, targets=["0"]),
    "adalora": lambda: dt.AdaLoRA(init_r=2, target_r=1, targets=["0"]),
    "vera": lambda: dt.VeRA(r=4, targets=["0"]),
    "orthogonal": lambda: dt.OrthogonalAdaptation(r=2, slot=0, targets=["0"]),
    "spiel": lambda: dt.SpIEL(density=0.3, targets=["0"]),
    "oft": lambda: dt.OFT(block_size=2, targets=["0"]),
    "full": lambda: dt.LoRA(r=1, targets=["1"], modules_to_save=["0"]),
}


def _conv_net(make):
    torch.manual_seed(0)
    conv = make()
    return nn.Sequential(conv, nn.Identity()), conv


def _conv_input(conv):
    torch.manual_seed(1)
    return torch.randn(2, conv.in_channels, *([7] * (conv.weight.dim() - 2)))


def _reference(conv, dW, db, x):
    """The conv with ``W + dW`` (linear layout reshaped to the kernel), ``b + db``: what the adapter must compute."""
    b = conv.bias if db is None else conv.bias + db
    return conv._conv_forward(x, conv.weight + dW.reshape(conv.weight.shape), b)


@pytest.mark.parametrize("method", CONV_METHODS)
@pytest.mark.parametrize("geometry", CONVS)
def test_every_structure_on_every_conv_geometry_is_exact(geometry, method, tmp_path):
    if method == "full" and "nobias" in geometry:
        pytest.skip("modules_to_save of a conv without bias: covered by the biased geometries")
    net, conv = _conv_net(CONVS[geometry])
    if method == "full":  # a whole conv trained as modules_to_save, next to a LoRA elsewhere
        net = nn.Sequential(conv, nn.Conv1d(conv.out_channels, 3, 1) if conv.weight.dim() == 3 else
                            (nn.Conv2d if conv.weight.dim() == 4 else nn.Conv3d)(conv.out_channels, 3, 1))
    x = _conv_input(conv).requires_grad_(False)
    W0 = conv.weight.detach().clone()
    base = net(x).detach()
    dt.attach(net, CONV_METHODS[method]())
    net.eval()  # dropout off for the comparisons
    torch.testing.assert_close(net(x), base, atol=1e-6, rtol=0)  # identity at init
    delta = dt.deltas(net, "default")["0"]
    with torch.no_grad():
        for p in delta.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    layer = net[0]
    dW, db = delta.dense().detach(), delta.dense_bias()
    want = _reference(layer.base, dW, None if db is None else db.detach(), x)
    want = net[1](want) if method == "full" else want
    out = net(x).detach()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    dt.merge(net)
    torch.testing.assert_close(net(x), out, atol=1e-5, rtol=1e-5)
    dt.unmerge(net)
    assert torch.equal(layer.base.weight, W0)  # bit for bit
    dt.save(net, tmp_path / "a")
    fresh, _ = _conv_net(CONVS[geometry])
    if method == "full":
        fresh = nn.Sequential(fresh[0], net[1].base if isinstance(net[1], dt.AdaptedLayer) else net[1])
    dt.load(fresh, tmp_path / "a")
    fresh.eval()
    torch.testing.assert_close(fresh(x), out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("geometry", CONVS)
def test_locon_gradients_equal_the_dense_reference(geometry):
    """LoRA on a conv runs as LoCon (A a conv with the base's geometry, B 1x1) and never builds dW; its gradients are
    those of the conv with W + s B A. An ungrouped conv runs it fused with the base conv as one autograd node, a
    grouped one as separate convs: both are checked."""
    net, conv = _conv_net(CONVS[geometry])
    dt.attach(net, dt.LoRA(r=3, alpha=6, targets=["0"]))
    d = dt.deltas(net, "default")["0"]
    with torch.no_grad():
        d.B.normal_(std=0.1)
    x = _conv_input(conv).requires_grad_(True)
    out = net(x)
    assert ("LoConConv" in type(out.grad_fn).__name__) == (conv.groups == 1)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    got = d.A.grad.clone(), d.B.grad.clone(), x.grad.clone()
    d.A.grad = d.B.grad = x.grad = None
    ref = _reference(net[0].base, d.scale * d.B @ d.A, None, x)
    (ref * g).sum().backward()
    for a, b in zip(got, (d.A.grad, d.B.grad, x.grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_all_conv_and_all_select_by_family_and_transposed_convs_are_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2), nn.ConvTranspose2d(1, 1, 2))
    assert dt.model.deltas(dt.attach(nn.Sequential(*net[:3]), dt.LoRA(r=1, targets="all-conv")), "default").keys() \
        == {"0"}
    both = dt.attach(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 4), nn.Linear(4, 2)),
                     dt.LoRA(r=1, targets="all"))
    assert set(dt.deltas(both, "default")) == {"0", "2", "3"}
    lin = dt.attach(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)), dt.LoRA(r=1))
    assert set(dt.deltas(lin, "default")) == {"2"}  # "all-linear" keeps its meaning
    with pytest.raises(ValueError, match="cannot adapt .*ConvTranspose2d"):
        dt.attach(net, dt.LoRA(r=1, targets=["3"]))


def _two_conv_loras():
    """Two convs (the second grouped) with LoRA adapters "a" and "b" of non-zero updates, in eval mode."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=2)).eval()
    for name in ("a", "b"):
        dt.attach(net, dt.LoRA(r=2, targets="all-conv"), name=name, activate=False)
        for d in dt.deltas(net, name).values():
            torch.nn.init.normal_(d.B, std=0.2)
    return net


def test_mixed_adapter_batches_on_convs_equal_each_row_alone():
    net = _two_conv_loras()
    dt.attach(net, dt.SpIEL(density=0.2, targets="all-conv"), name="c", activate=False)
    with torch.no_grad():
        for d in dt.deltas(net, "c").values():
            d.values.normal_(std=0.2)
    x = torch.randn(4, 3, 6, 6)
    rows = ["a", "c", None, "b"]
    with torch.no_grad():
        mixed = net(x, adapter_names=rows)
        for i, name in enumerate(rows):
            with dt.adapter_rows(net, [name]):
                torch.testing.assert_close(mixed[i:i + 1], net(x[i:i + 1]), atol=1e-6, rtol=1e-6)


def test_combine_interference_and_saved_records_work_on_convs(tmp_path):
    net = _two_conv_loras()
    x = torch.randn(2, 3, 6, 6)
    assert dt.combine(net, ["a", "b"], method="sum", name="ab") == {"0": 0.0, "2": 0.0}  # exact: ranks add up
    with torch.no_grad():
        combined = net(x)
        dt.set_active(net, ["a", "b"])
        torch.testing.assert_close(combined, net(x), atol=1e-6, rtol=1e-6)
    rows = dt.interference(net, ["a", "b"], inputs=[x])
    assert {r["module"] for r in rows} == {"0", "2"} and all(r["crosstalk_ab"] > 0 for r in rows)
    dt.save(net, tmp_path / "all")
    from deltatune.io import read_record

    record = read_record(tmp_path / "all" / "ab")
    assert {m: (s["layer"], s["out_features"], s["in_features"]) for m, s in record.modules.items()} == \
        {"0": ("nn_conv2d", 4, 27), "2": ("nn_conv2d", 4, 18)}  # linear layout: in/groups x kernel


def test_saved_conv_adapters_combined_without_a_model_keep_the_kernel_and_export(tmp_path):
    """``combine_records`` (``deltatune merge``) carries each conv's kernel and groups into the combination, so it
    exports to PEFT's conv layout and loads back with the sum's output."""
    from deltatune.combine.merge import combine_records
    from deltatune.io import read_record, write_record

    net = _two_conv_loras()
    dt.save(net, tmp_path / "ab", names=["a", "b"])
    record, errors = combine_records([read_record(tmp_path / "ab" / n) for n in ("a", "b")], method="sum")
    assert errors == {"0": 0.0, "2": 0.0}
    assert {m: (s["kernel"], s["groups"]) for m, s in record.modules.items()} == {"0": ([3, 3], 1), "2": ([3, 3], 2)}
    write_record(tmp_path / "sum", record)
    fresh = _two_conv_loras()
    for n in ("a", "b"):
        dt.delete(fresh, n)
    dt.load(fresh, tmp_path / "sum", name="sum")
    dt.save(fresh, tmp_path / "sum-peft", format="peft")
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        dt.set_active(net, ["a", "b"])
        want = net(x)
        torch.testing.assert_close(fresh(x), want, atol=1e-5, rtol=1e-5)
        again = _two_conv_loras()
        for n in ("a", "b"):
            dt.delete(again, n)
        dt.load(again, tmp_path / "sum-peft")
        torch.testing.assert_close(again(x), want, atol=1e-5, rtol=1e-5)
