"""Routed training: a batch whose rows use different adapters trains every adapter in one forward/backward, with
the gradients of each adapter equal to those of that adapter run alone on its own rows (losses summed over rows,
so the equality is exact up to float32 rounding), on real MiniLM weights, convolutions and under 2-rank DDP."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import SST2, run_one_and_two_ranks, tokenizer
from torch import nn

import deltatune as dt
from deltatune.adapted import AdaptedLayer
from deltatune.train import read_rows

HERE = Path(__file__).resolve().parent

# every structure mixed batches support: stacked (low-rank, gated SVD, frozen bases) and grouped (S2FT, sparse,
# rotations, full modules, embeddings)
SPECS = {
    "lora": lambda: dt.LoRA(r=4, targets=["query", "value", "word_embeddings"], modules_to_save=["classifier"]),
    "adalora": lambda: dt.AdaLoRA(init_r=6, target_r=4, targets=["query", "value"], orth_reg_weight=0.0),
    "vera": lambda: dt.VeRA(r=16, targets=["value", "output.dense"]),
    "orth": lambda: dt.OrthogonalAdaptation(r=8, slot=1, targets=["query", "key"]),
    "s2ft": lambda: dt.S2FT(v_ratio=0.1, o_ratio=0.1, d_ratio=0.02),
    "spiel": lambda: dt.SpIEL(density=0.001, targets=["query", "intermediate.dense"]),
    "oft": lambda: dt.OFT(block_size=32, targets=["value", "output.dense"]),
}


def load_minilm(path, seed=0):
    """MiniLM without model dropout (the gradients compared must not depend on random masks), training mode."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def randomize(model, names, std=0.03):
    """Non-zero values for every trainable tensor, so every factor gets a non-zero gradient."""
    for k, name in enumerate(names):
        g = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for d in dt.deltas(model, name).values():
                for p in d.parameters():
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


@pytest.fixture(scope="module")
def many(minilm_dir):
    model = load_minilm(minilm_dir)
    for name, spec in SPECS.items():
        dt.attach(model, spec(), name=name, activate=False)
    randomize(model, SPECS)
    dt.set_active(model, list(SPECS))  # all of them train (the routing decides which rows each one sees)
    return model.train()


@pytest.fixture(scope="module")
def batch(minilm_dir):
    rows = read_rows(SST2 / "dev.tsv", 10)
    tok = tokenizer(minilm_dir)
    b = dict(tok([r["sentence"] for r in rows], padding=True, truncation=True, max_length=32, return_tensors="pt"))
    b["labels"] = torch.tensor([int(r["label"]) for r in rows])
    return b


def loss_sum(model, batch, rows=None, names=None):
    """Cross-entropy summed over the rows ``rows`` of ``batch`` (routed with ``names`` when given)."""
    b = {k: v if rows is None else v[rows] for k, v in batch.items()}
    labels = b.pop("labels")
    out = model(**b) if names is None else model(**b, adapter_names=names)
    return F.cross_entropy(out.logits, labels, reduction="sum")


def grads(model):
    g = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return g


def mixed_grads(model, batch, names):
    model.zero_grad(set_to_none=True)
    loss_sum(model, batch, names=names).backward()
    return grads(model)


def reference_grads(model, batch, names):
    """Sum over adapters of the gradients of that adapter alone (the single-adapter path) on its own rows."""
    trained = dt.active_adapters(model)
    want = {}
    try:
        for a in dict.fromkeys(n for n in names if n not in (None, "base")):
            dt.set_active(model, a)
            loss_sum(model, batch, rows=[i for i, n in enumerate(names) if n == a]).backward()
            for k, v in grads(model).items():
                want[k] = want.get(k, 0) + v
    finally:
        dt.set_active(model, trained)
    return want


def assert_grads_match(got, want, names, context=""):
    """``got`` holds a gradient for every trainable tensor: those of adapters in ``want`` equal, the rest zero."""
    assert set(want) <= set(got), sorted(set(want) - set(got))
    for k, g in got.items():
        w = want.get(k)
        if w is None:
            assert not g.any(), f"{context}{k}: its adapter has no rows, but the gradient is not zero"
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6 * max(1.0, float(w.abs().max())),
                                       msg=f"{context}{k}")
    adapters = {n for n in names if n not in (None, "base")}
    for a in adapters:  # every adapter in the batch really got gradients
        assert any(v.abs().max() > 0 for k, v in want.items() if f".{a}." in k), a


def test_mixed_batch_gradients_equal_the_sum_of_each_adapter_on_its_own_rows(many, batch):
    model = many
    names = ["lora", "adalora", "vera", "orth", "s2ft", "spiel", "oft", None, "lora", "base"]
    got = mixed_grads(model, batch, names)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert set(got) == trainable  # every trainable tensor has a gradient (zeros for adapters without rows)
    assert_grads_match(got, reference_grads(model, batch, names), names)
    # another routing of the same rows: grouped and stacked adapters in other positions, some adapters absent
    names = ["oft", "oft", "lora", "spiel", "adalora", "adalora", "base", "s2ft", "lora", "oft"]
    assert_grads_match(mixed_grads(model, batch, names), reference_grads(model, batch, names), names)


def test_base_rows_leave_every_adapter_without_gradient(many, batch):
    model = many
    got = mixed_grads(model, batch, [None, "base"] * 5)
    assert got and all(not g.any() for g in got.values())
    names = [None] * 9 + ["vera"]
    got = mixed_grads(model, batch, names)
    assert_grads_match(got, reference_grads(model, batch, names), names)
    assert all(not g.any() for k, g in got.items() if ".vera." not in k)


def test_a_batch_of_one_adapter_trains_through_the_routing(many, batch):
    """In training mode a batch whose rows all use one adapter is routed too (no merge, the same graph shape as a
    mixed batch), and gives that adapter's gradients."""
    model = many
    names = ["s2ft"] * 10
    assert_grads_match(mixed_grads(model, batch, names), reference_grads(model, batch, names), names)


def test_only_trainable_adapters_train_the_others_are_applied_frozen(many, batch):
    model = many
    try:
        dt.set_active(model, ["lora", "oft", "vera"], trainable=["lora", "vera"])
        names = ["lora", "oft", "vera", "adalora", "lora", None, "oft", "vera", "s2ft", "lora"]
        model.zero_grad(set_to_none=True)
        loss_sum(model, batch, names=names).backward()
        got = grads(model)
        assert got and all(".lora." in k or ".vera." in k for k in got)
        # the frozen adapters still act on their rows: the loss is that of the mixed batch with everything trained
        with torch.no_grad():
            frozen = loss_sum(model, batch, names=names)
            dt.set_active(model, list(SPECS))
            torch.testing.assert_close(loss_sum(model, batch, names=names), frozen)
        # and the trainable ones get exactly their own rows' gradients
        for a in ("lora", "vera"):
            dt.set_active(model, a)
            loss_sum(model, batch, rows=[i for i, n in enumerate(names) if n == a]).backward()
            for k, v in grads(model).items():
                torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-6 * max(1.0, float(v.abs().max())), msg=k)
    finally:
        dt.set_active(model, list(SPECS))


def test_an_optimizer_step_changes_each_adapter_only_through_its_own_rows(minilm_dir, batch):
    def build():
        model = load_minilm(minilm_dir)
        for name in ("lora", "s2ft", "oft", "vera"):
            dt.attach(model, SPECS[name](), name=name, activate=False)
        randomize(model, ["lora", "s2ft", "oft", "vera"])
        return dt.set_active(model, ["lora", "s2ft", "oft", "vera"]).train()

    names = ["lora", "s2ft", "lora", "oft", None, "s2ft", "oft", "lora", "base", "s2ft"]  # vera has no rows
    model = build()
    before = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    loss_sum(model, batch, names=names).backward()
    opt.step()
    after = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}

    ref = build()  # the same start; each adapter steps alone on its own rows
    for a in ("lora", "s2ft", "oft"):
        dt.set_active(ref, a)
        opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.05)
        loss_sum(ref, batch, rows=[i for i, n in enumerate(names) if n == a]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for k, p in ref.named_parameters():
        if k in after:
            torch.testing.assert_close(after[k], p.detach(), rtol=1e-5, atol=1e-7, msg=k)
            if ".vera." in k:
                assert torch.equal(after[k], before[k])
            elif ".deltas." in k:
                assert not torch.equal(after[k], before[k]), k


def test_inference_keeps_the_cached_detached_path(many, batch):
    model = many
    names = ["lora", "adalora", "vera", "orth", "s2ft", "spiel", "oft", None, "lora", "base"]
    b = {k: v for k, v in batch.items() if k != "labels"}
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    model.eval()
    try:
        with torch.no_grad():
            first = model(**b, adapter_names=names).logits
        caches = {id(m): m.__dict__.get("_plan_cache") for m in layers}
        assert any(c is not None for c in caches.values())
        with torch.no_grad():
            second = model(**b, adapter_names=names).logits
        # the stacked factors were reused, not rebuilt (same cache objects), and hold no graph
        assert all(m.__dict__.get("_plan_cache") is caches[id(m)] for m in layers)
        for c in caches.values():
            if c is not None and c[1][0] is not None:
                assert not c[1][0][0].requires_grad and not c[1][0][1].requires_grad
        assert torch.equal(first, second) and first.grad_fn is None
        # eval mode with gradients on (e.g. attributions) but nothing routed needing them: still the cached path
        for p in model.parameters():
            p.requires_grad_(False)
        out = model(**b, adapter_names=names).logits
        assert out.grad_fn is None and all(m.__dict__.get("_plan_cache") is caches[id(m)] for m in layers)
        # the training path gives the same outputs as the inference path
        dt.set_active(model, list(SPECS))
        trained = model(**b, adapter_names=names).logits
        assert trained.grad_fn is not None
        torch.testing.assert_close(trained.detach(), first, atol=2e-5, rtol=0)
    finally:
        dt.set_active(model, list(SPECS))
        model.train()


def test_gradient_checkpointing_is_refused_in_the_call_and_works_inside_the_block(minilm_dir, batch):
    model = load_minilm(minilm_dir)
    for name in ("lora", "s2ft"):
        dt.attach(model, SPECS[name](), name=name, activate=False)
    randomize(model, ["lora", "s2ft"])
    dt.set_active(model, ["lora", "s2ft"]).train()
    names = ["lora", "s2ft", None, "lora", "s2ft", "lora", "base", "s2ft", "lora", "lora"]
    plain = mixed_grads(model, batch, names)
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2 (the old name warns)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="gradient checkpointing.*dt.adapter_rows"):
        loss_sum(model, batch, names=names)
    with dt.adapter_rows(model, names):
        loss_sum(model, batch).backward()
    for k, g in grads(model).items():
        torch.testing.assert_close(g, plain[k], rtol=1e-4, atol=1e-7, msg=k)


# -- small models: convolutions, both low-rank kernels, dropout ----------------------------------------------------
def _attach_all(net, methods):
    for name, method in methods.items():
        dt.attach(net, method, name=name, activate=False)
    randomize(net, methods, std=0.2)
    return dt.set_active(net, list(methods)).train()


def _check_sum(net, x, names, loss=lambda y: y.pow(2).sum()):
    net.zero_grad(set_to_none=True)
    loss(net(x, adapter_names=names)).backward()
    got = grads(net)
    trained = dt.active_adapters(net)
    want = {}
    for a in dict.fromkeys(n for n in names if n is not None):
        dt.set_active(net, a)
        loss(net(x[[i for i, n in enumerate(names) if n == a]])).backward()
        for k, v in grads(net).items():
            want[k] = want.get(k, 0) + v
    dt.set_active(net, trained)
    assert_grads_match(got, want, names)


def test_conv_layers_train_in_mixed_batches():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                        nn.Flatten(), nn.Linear(8 * 36, 5))
    _attach_all(net, {"a": dt.LoRA(r=2, targets="all"), "b": dt.AdaLoRA(init_r=3, target_r=2, targets="all",
                                                                         orth_reg_weight=0.0),
                      "c": dt.SpIEL(density=0.2, targets="all"), "d": dt.LoRA(r=3, targets=["0"])})
    _check_sum(net, torch.randn(6, 3, 6, 6), ["a", "c", None, "b", "a", "c"])  # d has no rows: zero gradients


@pytest.mark.parametrize("tokens", [1, 40])  # the masked kernel (few tokens per row) and the gathered one
def test_both_lowrank_kernels_train(tokens):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    _attach_all(net, {"a": dt.LoRA(r=2), "b": dt.LoRA(r=5), "c": dt.VeRA(r=4), "d": dt.OFT(block_size=4),
                      "e": dt.SpIEL(density=0.1)})
    _check_sum(net, torch.randn(7, tokens, 16), ["a", "b", "c", "d", None, "a", "e"])


def test_layers_with_only_frozen_adapters_pass_gradients_through():
    """Layers whose routed adapters are all frozen run the inference kernels (in place) on inputs that need
    gradients: the trainable adapter below them gets exactly its own rows' gradients."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    _attach_all(net, {"a": dt.LoRA(r=2, targets=["0"]), "b": dt.LoRA(r=3, targets=["2"]),
                      "c": dt.SpIEL(density=0.2, targets=["2"])})
    dt.set_active(net, ["a", "b", "c"], trainable="a")
    for tokens in (1, 30):
        x = torch.randn(5, tokens, 16)
        names = ["a", "b", "c", "a", None]
        net.zero_grad(set_to_none=True)
        net(x, adapter_names=names).pow(2).sum().backward()
        got = grads(net)
        assert set(got) == {"0.deltas.a.A", "0.deltas.a.B"}
        frozen = net[2].__dict__["_plan_cache"][1]
        assert frozen[0] is not None and frozen[1] == ["c"]  # the cached inference plan ran on layer 2
        dt.set_active(net, "a")
        net(x[[0, 3]]).pow(2).sum().backward()
        for k, v in grads(net).items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
        dt.set_active(net, ["a", "b", "c"], trainable="a")


def test_training_takes_a_serving_merge_out_and_merges_nothing():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    _attach_all(net, {"a": dt.LoRA(r=2), "b": dt.LoRA(r=3)})
    x = torch.randn(4, 10, 16)
    dt.set_serving(net, merge_single=True)
    net.eval()
    with torch.no_grad():
        served = net(x, adapter_names=["a"] * 4)
    assert list(net[0].merged) == ["a"]  # the inference fast path merged it
    net.train()
    trained = net(x, adapter_names=["a"] * 4)
    assert not net[0].merged and not net[2].merged  # taken out, and training merged nothing
    torch.testing.assert_close(trained.detach(), served, atol=1e-5, rtol=0)
    _check_sum(net, x, ["a"] * 4)
    assert not net[0].merged


def test_input_dropout_acts_on_its_own_adapters_rows_only():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16))
    _attach_all(net, {"drop": dt.LoRA(r=4, dropout=0.5), "keep": dt.LoRA(r=4)})
    x = torch.randn(4, 20, 16)
    names = ["drop", "keep", None, "drop"]
    with torch.no_grad():
        net.eval()
        clean = net(x, adapter_names=names)
        net.train()
        torch.manual_seed(1)
        noisy = net(x, adapter_names=names)  # no grad: the inference path (no dropout)
    torch.testing.assert_close(noisy, clean)
    torch.manual_seed(1)
    noisy = net(x, adapter_names=names)
    assert not torch.allclose(noisy[0], clean[0]) and not torch.allclose(noisy[3], clean[3])
    torch.testing.assert_close(noisy[1:3], clean[1:3], atol=1e-6, rtol=0)
    # the dropped rows are what the adapter alone computes under the same mask
    dt.set_active(net, "drop")
    torch.manual_seed(1)
    drop = dt.deltas(net, "drop")["0"]
    xd = drop.drop(x[[0, 3]])
    dt.set_active(net, ["drop", "keep"])
    B, A, s = drop.live_factors()
    want = F.linear(x[[0, 3]], net[0].base.weight, net[0].base.bias) + s * xd @ A.t() @ B.t()
    torch.testing.assert_close(noisy[[0, 3]], want, atol=1e-5, rtol=0)


# -- DDP ----------------------------------------------------------------------------------------------------------
def test_two_ddp_ranks_train_a_routed_batch_like_one_process(tmp_path):
    """2 gloo ranks, each with half of a routed batch (each half lacks one adapter, and one adapter
    has rows on neither), plain DDP (no find_unused_parameters): both ranks end with identical adapters, equal to
    one process on the whole batch."""
    run_one_and_two_ranks(HERE / "routed_ddp_worker.py", ["--data", str(SST2 / "dev.tsv")], tmp_path / "one",
                          tmp_path / "two", timeout=400)
    single = torch.load(tmp_path / "one" / "rank0.pt")
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1)]
    info = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert info[0]["absent"] == ["vera"] and info[1]["absent"] == ["lora"]  # each rank lacks one
    assert single.keys() == ranks[0].keys() == ranks[1].keys()
    for k, v in ranks[0].items():
        assert torch.equal(v, ranks[1][k]), f"ranks disagree on {k}"
        torch.testing.assert_close(v, single[k], atol=1e-6, rtol=1e-5, msg=k)
    start = torch.load(tmp_path / "one" / "start.pt")
    for k, v in single.items():
        moved = not torch.equal(v, start[k])
        assert moved == (".unused." not in k), k  # every adapter with rows trained; the one without stayed


def test_inference_batches_inside_a_training_block_follow_the_optimizer_steps():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    for name in ("a", "b"):
        dt.attach(net, dt.LoRA(r=2, targets=["0", "2"]), name=name, activate=False)
    dt.set_active(net, ["a", "b"]).train()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    x, names = torch.randn(4, 8), ["a", "b", "a", "b"]
    with dt.adapter_rows(net, names):
        with torch.no_grad():
            before = net(x)  # caches the stacked factors of this routing
        net(x).pow(2).sum().backward()
        opt.step()
        with torch.no_grad():
            after = net(x)
    with dt.adapter_rows(net, names), torch.no_grad():
        torch.testing.assert_close(after, net(x))
    assert not torch.allclose(after, before)
