"""The public verbs on real models: attach, switch, disable, merge / unmerge, unload, counts."""
from __future__ import annotations

import pytest
import torch
from helpers import changed_entries, logits, make_minilm, randomize, set_random_values, state_snapshot

import deltatune as dt
from deltatune.deltas.rotation import cayley, rotate


QKV = ["query", "key", "value"]


@pytest.mark.parametrize(
    "method",
    [
        dt.LoRA(r=8, alpha=16),
        dt.LoRA(r=4, init="gaussian", use_rslora=True),
        dt.PiSSA(r=8),
        dt.PiSSA(r=8, niter=4),
        dt.MiLoRA(r=8),
        dt.OLoRA(r=8),
    ],
    ids=["kaiming", "gaussian-rslora", "pissa", "pissa-niter4", "milora", "olora"],
)
def test_identity_at_init(minilm_dir, minilm_batch, method):
    model = make_minilm(minilm_dir)
    y0 = logits(model, minilm_batch)
    dt.attach(model, method)
    y1 = logits(model, minilm_batch)
    if method.init in ("kaiming", "gaussian"):
        assert torch.equal(y0, y1)
    else:
        torch.testing.assert_close(y1, y0, atol=1e-5, rtol=0)
        # and the residual part is really a non-trivial piece of W
        d = next(iter(dt.deltas(model, "default").values()))
        assert d.A0.abs().sum() > 0 and torch.equal(d.A, d.A0)


def test_training_changes_only_adapter_parameters(minilm_dir, minilm_batch):
    model = make_minilm(minilm_dir).train()
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    dt.attach(model, dt.LoRA(r=4, alpha=8, targets="all-linear", dropout=0.1, modules_to_save=["classifier"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * 37 + 2  # A, B for 36 encoder linears + pooler, classifier weight and bias
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    for _ in range(3):
        loss = model(**minilm_batch, labels=labels).loss
        loss.backward()
        dt.after_backward(model)
        opt.step()
        dt.step(model, opt)
        opt.zero_grad()
    d = dt.deltas(model, "default")["bert.encoder.layer.3.output.dense"]
    assert d.B.abs().sum() > 0
    plain = dt.unload(model, merge=False)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, base_before[k]), k


def test_forward_equals_merged_equals_unloaded(minilm_dir, minilm_batch):
    model = make_minilm(minilm_dir)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    dt.attach(model, dt.LoRA(r=8, alpha=16, targets="all-linear", modules_to_save=["classifier"]))
    randomize(model, "default")
    y_unmerged = logits(model, minilm_batch)
    dt.merge(model)
    torch.testing.assert_close(logits(model, minilm_batch), y_unmerged, atol=1e-5, rtol=0)
    dt.unmerge(model)
    torch.testing.assert_close(logits(model, minilm_batch), y_unmerged, atol=1e-5, rtol=0)
    layer = model.bert.encoder.layer[2].intermediate.dense
    torch.testing.assert_close(layer.base.weight, w0["bert.encoder.layer.2.intermediate.dense.weight"],
                               atol=1e-6, rtol=0)
    plain = dt.unload(model, merge=True)
    assert not any(isinstance(m, dt.AdaptedLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain, minilm_batch), y_unmerged, atol=1e-5, rtol=0)
    assert dt.adapters(plain) == []


def test_several_adapters_add_switch_disable_delete(minilm_dir, minilm_batch):
    model = make_minilm(minilm_dir)
    y0 = logits(model, minilm_batch)
    dt.attach(model, dt.LoRA(r=4, targets=QKV), name="a")
    dt.attach(model, dt.LoRA(r=6, targets=["value", "dense"]), name="b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    assert dt.adapters(model) == ["a", "b"] and dt.active_adapters(model) == ["b"]

    # on one layer, the outputs of active adapters add
    layer = model.bert.encoder.layer[1].attention.self.value
    x = torch.randn(2, 5, 384)
    dt.set_active(model, ["a", "b"])
    with torch.no_grad():
        expect = layer.base(x) + layer.deltas["a"](x) + layer.deltas["b"](x)
        torch.testing.assert_close(layer(x), expect, atol=1e-5, rtol=0)

    ya_b = logits(model, minilm_batch)
    dt.set_active(model, "a")
    ya = logits(model, minilm_batch)
    assert not torch.allclose(ya, ya_b)
    # only the active adapter trains
    assert all(p.requires_grad for p in dt.deltas(model, "a")["bert.encoder.layer.0.attention.self.query"].parameters())
    assert not any(p.requires_grad for d in dt.deltas(model, "b").values() for p in d.parameters())
    with dt.disabled(model):
        assert torch.equal(logits(model, minilm_batch), y0)
    dt.merge(model)
    with dt.disabled(model):  # merged adapters come out and go back in
        torch.testing.assert_close(logits(model, minilm_batch), y0, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model, minilm_batch), ya, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="merged"):
        dt.set_active(model, "b")
    dt.unmerge(model)
    dt.delete(model, "a")
    assert dt.adapters(model) == ["b"] and dt.active_adapters(model) == ["b"]
    assert not isinstance(model.bert.encoder.layer[0].attention.self.query, dt.AdaptedLayer)
    dt.delete(model, "b")
    # merge + unmerge round-trips the weights up to float rounding (exact restore would need a weight copy)
    torch.testing.assert_close(logits(model, minilm_batch), y0, atol=1e-6, rtol=0)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(targets=["qurey"]), r"'qurey'.*close names: query"),
        (dict(targets=["query", "vlaue"]), r"'vlaue'"),
        (dict(targets=r".*attention"), "cannot adapt"),
        (dict(r=0), "positive"),
        (dict(r=-3), "positive"),
        (dict(init="svd"), "unknown init"),
        (dict(init="milora", r=1000, targets=["query"]), "exceeds"),
    ],
)
def test_bad_input_leaves_model_unchanged(minilm_dir, kwargs, match):
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.LoRA(r=2, targets=["key"]), name="existing")
    state, types = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        dt.attach(model, dt.LoRA(**kwargs), name="new")
    after, after_types = _snapshot(model)
    assert types == after_types and state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert dt.adapters(model) == ["existing"]


def test_name_clash_and_unknown_names(minilm_dir):
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.LoRA(r=2, targets=["key"]), name="a")
    with pytest.raises(ValueError, match="already attached"):
        dt.attach(model, dt.LoRA(r=2, targets=["query"]), name="a")
    with pytest.raises(ValueError, match="must be letters"):
        dt.attach(model, dt.LoRA(r=2, targets=["query"]), name="a.b")
    with pytest.raises(ValueError, match="no adapter named 'zzz'"):
        dt.set_active(model, "zzz")
    assert dt.adapters(model) == ["a"]


def test_trainable_parameters_counts(minilm_dir):
    model = make_minilm(minilm_dir)
    total0 = sum(p.numel() for p in model.parameters())
    dt.attach(model, dt.LoRA(r=8, targets=["query", "value"]))
    trainable, total = dt.trainable_parameters(model)
    assert trainable == 6 * 2 * 8 * (384 + 384)
    assert total == total0 + trainable


def test_half_precision_merge_accumulates_in_fp32():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64).to(torch.bfloat16)
    ref = lin.weight.detach().float().clone()
    model = torch.nn.Sequential(lin)
    dt.attach(model, dt.LoRA(r=4, alpha=4, targets=["0"]))
    d = dt.deltas(model, "default")["0"]
    assert d.A.dtype == torch.float32  # adapter trains in fp32 on a bf16 base
    with torch.no_grad():
        d.B.normal_(std=1e-2)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16
    dt.merge(model)
    expect = (ref + d.dense().float()).to(torch.bfloat16)
    assert torch.equal(model[0].base.weight, expect)
    dt.unmerge(model)
    assert (model[0].base.weight.float() - ref).abs().max() <= 2 ** -7 * ref.abs().max()


def test_a_subclass_that_keeps_its_parents_name_does_not_replace_it_in_the_registry():
    class Tweaked(dt.LoRA):  # a user's extension (or a test's) without a name of its own
        pass

    assert type(dt.Method.from_dict({"method": "lora", "r": 2})) is dt.LoRA


Q_NAME = "bert.encoder.layer.0.attention.self.query"


def test_weighted_merge_sums_adapters_with_lambda_and_unmerges_exactly(minilm_dir, minilm_batch):
    model = make_minilm(minilm_dir)
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    for k, name in enumerate(["a", "b"]):
        dt.attach(model, dt.OrthogonalAdaptation(r=8, slot=k, targets=["query", "value"]), name=name, activate=False)
        set_random_values(model, name, std=0.05, seed=k)
    dt.attach(model, dt.OFT(block_size=32, targets=["key"]), name="rot", activate=False)
    set_random_values(model, "rot", std=0.05, seed=3)
    dense = {n: {m: d.dense().detach() for m, d in dt.deltas(model, n).items()} for n in ("a", "b")}
    with pytest.raises(ValueError, match="2 merge weights for 3 adapters"):
        dt.merge(model, ["a", "b", "rot"], weights=[0.6, 0.6])
    dt.merge(model, ["a", "b", "rot"], weights={"a": 0.6, "b": 0.6, "rot": 0.5})
    q = model.bert.encoder.layer[0].attention.self
    torch.testing.assert_close(q.query.weight.detach(), W0[Q_NAME + ".weight"] + 0.6 * (dense["a"][Q_NAME]
                                                                                     + dense["b"][Q_NAME]))
    key = "bert.encoder.layer.0.attention.self.key"
    R_half = cayley(dt.deltas(model, "rot")[key].skew().detach() * 0.5)
    torch.testing.assert_close(q.key.weight.detach(), rotate(W0[key + ".weight"], R_half.transpose(1, 2)))
    with dt.disabled(model):  # takes the weighted merges out and puts them back with their weights
        pass
    torch.testing.assert_close(q.query.weight.detach(), W0[Q_NAME + ".weight"] + 0.6 * (dense["a"][Q_NAME]
                                                                                     + dense["b"][Q_NAME]))
    dt.unmerge(model)
    for n, p in dt.unload(model).named_parameters():
        torch.testing.assert_close(p, W0[n], rtol=0, atol=1e-6)


def test_rotation_and_additive_adapters_on_one_layer_merge_safely_and_unmerge_exactly(minilm_dir, minilm_batch):
    model = make_minilm(minilm_dir)
    base = logits(model, minilm_batch)
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    dt.attach(model, dt.LoRA(r=4, targets=["query", "value"]), name="l", activate=False)
    dt.attach(model, dt.OFT(block_size=32, targets=["query"]), name="o", activate=False)
    set_random_values(model, "l", std=0.05, seed=1)
    set_random_values(model, "o", std=0.05, seed=2)
    dt.set_active(model, ["l", "o"])
    live = logits(model, minilm_batch)  # W R^T + dW on the query layers
    with pytest.raises(ValueError, match="while 'o' is live"):
        dt.merge(model, ["l"])  # the rotation would act on the merged update too
    dt.merge(model, ["l", "o"])  # the rotation goes in first, whatever the order given
    torch.testing.assert_close(logits(model, minilm_batch), live, rtol=1e-4, atol=1e-4)
    with dt.disabled(model):
        torch.testing.assert_close(logits(model, minilm_batch), base, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(model, minilm_batch), live, rtol=1e-4, atol=1e-4)
    dt.unmerge(model, ["o"])  # not the last one merged: "l" comes out and goes back in around it
    dt.unmerge(model, ["l"])
    torch.testing.assert_close(logits(model, minilm_batch), live, rtol=1e-4, atol=1e-4)
    for n, p in dt.unload(model).named_parameters():
        torch.testing.assert_close(p, W0[n], rtol=0, atol=1e-6)


# -- B12: merge / unmerge round trips are exact for every structure ----------------------------------------------------
TARGETS = r"bert\.encoder\.layer\.0\.attention\.output\.dense"  # one 384 x 384 layer: 100 round trips stay quick


STACKS = {  # adapters attached (and active) together
    "lora": [dt.LoRA(r=4, targets=TARGETS)],
    "s2ft": [dt.S2FT(targets=TARGETS, o_ratio=0.1, d_ratio=0.0)],
    "spiel": [dt.SpIEL(density=0.05, targets=TARGETS)],
    "vera": [dt.VeRA(r=16, targets=TARGETS)],
    "head": [dt.LoRA(r=2, targets=TARGETS, modules_to_save=["classifier"])],
    "oft": [dt.OFT(block_size=32, targets=TARGETS)],
    "oft+lora": [dt.OFT(block_size=32, targets=TARGETS), dt.LoRA(r=4, targets=TARGETS)],
}


def _stacked(minilm_dir, methods, dtype=torch.float32):
    """MiniLM with the adapters attached, every delta parameter drawn at random (so merges change the weights),
    all of them active."""
    model = make_minilm(minilm_dir).to(dtype)
    names = [f"a{i}" for i in range(len(methods))]
    for name, method in zip(names, methods):
        dt.attach(model, method, name=name)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in names:
            for delta in dt.deltas(model, name).values():
                for p in delta.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))
    dt.set_active(model, names)
    return model


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_merge_round_trips_and_disabled_blocks_are_bit_exact(minilm_dir, minilm_batch, stack):
    model = _stacked(minilm_dir, STACKS[stack])
    with torch.no_grad():
        live = model(**minilm_batch).logits
    base = state_snapshot(model)

    dt.merge(model)
    assert changed_entries(model, base), "the merge must change the base weights"
    with torch.no_grad():
        merged_out = model(**minilm_batch).logits
    torch.testing.assert_close(merged_out, live, atol=2e-5, rtol=1e-4)  # merged computes what the live adapters did
    dt.unmerge(model)
    assert changed_entries(model, base) == []

    for _ in range(100):
        dt.merge(model)
        dt.unmerge(model)
    assert changed_entries(model, base) == []

    dt.merge(model)
    merged = state_snapshot(model)
    for i in range(100):
        with dt.disabled(model):
            if i == 0:
                assert changed_entries(model, base) == []  # inside: the plain base weights, bit for bit
    assert changed_entries(model, merged) == []  # disabled() leaves the merged weights where they were
    dt.unmerge(model)
    assert changed_entries(model, base) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_unmerge_restores_the_stored_weights(minilm_dir, dtype):
    """Merging into half-precision weights rounds (the update is accumulated in float32, the sum stored in the
    weight's dtype); unmerging still gives back the original bits."""
    model = _stacked(minilm_dir, STACKS["oft+lora"], dtype)
    base = state_snapshot(model)
    for _ in range(20):
        dt.merge(model)
        dt.unmerge(model)
    assert changed_entries(model, base) == []


def test_unmerge_out_of_order_is_exact(minilm_dir):
    """LIFO: unmerging the first of two merged adapters takes the later one out and back in, exactly."""
    model = _stacked(minilm_dir, [dt.LoRA(r=4, targets=TARGETS), dt.VeRA(r=16, targets=TARGETS)])
    base = state_snapshot(model)
    dt.merge(model, ["a0", "a1"])
    dt.unmerge(model, "a0")
    only_a1 = state_snapshot(model)
    dt.unmerge(model, "a1")
    assert changed_entries(model, base) == []
    dt.merge(model, ["a1"])
    assert changed_entries(model, only_a1) == []


peft = pytest.importorskip("peft")


def test_print_trainable_parameters_matches_peft(minilm_dir, capsys):
    ours = make_minilm(minilm_dir)
    dt.attach(ours, dt.LoRA(r=8, targets=["query", "value"]))
    counts = dt.print_trainable_parameters(ours)
    line = capsys.readouterr().out.strip()
    ref = peft.get_peft_model(make_minilm(minilm_dir), peft.LoraConfig(r=8, target_modules=["query", "value"]))
    ref.print_trainable_parameters()
    assert line == capsys.readouterr().out.strip()
    assert line.startswith(f"trainable params: {counts[0]:,d} || all params: {counts[1]:,d} || trainable%: ")
