"""Sparse fine-tuning: unit maps, the S2FT sliced delta and its selection, the SpIEL sparse delta and its prune /
regrow controller, composition, checkpoints and export, on real MiniLM and SmolLM2-135M weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DATA, ROOT, logits, make_minilm, make_smollm, sst2_batches, train_loop

import deltatune as dt
from deltatune.deltas.sliced import sliced_linear
from deltatune.deltas.sparse import sparse_linear
from deltatune.targets import find_blocks


def _real_weight(minilm_dir, name="encoder.layer.2.intermediate.dense"):
    m = make_minilm(minilm_dir)
    layer = m.bert.get_submodule(name.removeprefix("bert."))
    return layer.weight.detach().clone(), layer.bias.detach().clone()


def _close(a, b):
    """Equal up to float32 rounding at the scale of ``b``."""
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def _grads(fn, *tensors):
    for t in tensors:
        t.grad = None
    fn().pow(2).sum().backward()
    return [t.grad.clone() for t in tensors]


# -- S2FT: the sliced delta -------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1])
def test_sliced_forward_and_gradients_equal_a_masked_dense_reference(minilm_dir, axis):
    W, b = _real_weight(minilm_dir)  # 1536 x 384
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
    gx_ref, gdense = _grads(reference, x, dense)
    for path in ("fused", "generic"):
        def ours():
            if path == "fused":
                return sliced_linear(x.reshape(-1, W.shape[1]), W, b, d.D, d.idx, axis).view(2, 7, -1)
            return d.add_to(F.linear(x, W, b), x, inplace=False)
        torch.testing.assert_close(ours(), reference(), rtol=1e-5, atol=1e-5)
        gx, gD = _grads(ours, x, d.D)
        _close(gx, gx_ref)
        # the block's gradient is the dense gradient at the selected rows / columns (the masked dense gradient)
        _close(gD, (gdense * mask).index_select(axis, idx))


def test_sliced_gradients_accumulate_over_backward_calls(minilm_dir):
    W, b = _real_weight(minilm_dir)
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
    W, b = _real_weight(minilm_dir, "encoder.layer.2.output.dense")  # 384 x 1536, column type as S2FT's down
    d = dt.SlicedDelta(*W.shape, torch.arange(0, 1536, 50), 1)
    x = torch.randn(64, W.shape[1], requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sliced_linear(x, W, b, d.D, d.idx, 1)
    activations = [t for t in saved if t.shape[0] == 64]
    assert [tuple(t.shape) for t in activations] == [(64, d.idx.numel())]


# -- unit maps and S2FT on real models ----------------------------------------------------------------------------
def test_unit_maps_find_blocks_and_couple_gqa_groups(smollm_dir, minilm_dir):
    blocks = find_blocks(make_smollm(smollm_dir))
    assert len(blocks) == 30 and blocks[0].heads == 9 and blocks[0].kv_heads == 3 and blocks[0].head_dim == 64
    group = blocks[4].coupled("kv", 2)  # KV head 2 serves query heads 6, 7, 8
    assert group["v"][1].tolist() == list(range(128, 192)) and group["k"][1].tolist() == list(range(128, 192))
    assert group["o"] == (1, group["o"][1]) and group["o"][1].tolist() == list(range(384, 576))
    assert blocks[4].coupled("head", 4)["v"][1].tolist() == list(range(64, 128))  # head 4 reads KV head 1
    channel = blocks[0].coupled("channel", 7)
    assert {r: (a, i.tolist()) for r, (a, i) in channel.items()} == {"up": (0, [7]), "gate": (0, [7]),
                                                                      "down": (1, [7])}
    bert = find_blocks(make_minilm(minilm_dir))
    assert [b.names["down"] for b in bert][:1] == ["bert.encoder.layer.0.output.dense"]
    assert bert[0].names["o"] == "bert.encoder.layer.0.attention.output.dense" and bert[0].group_size == 1


def test_s2ft_on_gqa_smollm2_is_exact_at_init_and_lands_on_the_right_heads(smollm_dir, smollm_batch):
    model = make_smollm(smollm_dir)
    before = logits(model, smollm_batch)
    dt.attach(model, dt.S2FT(v_ratio=0.2, o_ratio=0.2, u_ratio=0.01, d_ratio=0.01, gate_with_up=True))
    torch.testing.assert_close(logits(model, smollm_batch), before, rtol=0, atol=0)
    deltas = dt.deltas(model, "default")
    blocks = find_blocks(model, modules=dict(dt.model.base_modules(model)))
    # counts follow the ratios over the global pool: 0.2 * 30 * 3 KV heads, 0.2 * 30 * 9 query heads, ...
    count = {r: sum(d.idx.numel() for n, d in deltas.items() if n.endswith(r)) for r in
             ("v_proj", "o_proj", "up_proj", "gate_proj", "down_proj")}
    assert count == {"v_proj": 18 * 64, "o_proj": 54 * 64, "up_proj": 460, "gate_proj": 460, "down_proj": 460}
    # the up and gate rows move together
    for b in blocks:
        up, gate = deltas.get(b.names["up"]), deltas.get(b.names["gate"])
        assert (up is None) == (gate is None) and (up is None or torch.equal(up.idx, gate.idx))
    # a v delta on KV group g changes exactly the attention outputs of g's query heads (o_proj's input columns)
    name = next(n for n in deltas if n.endswith("v_proj"))
    b = next(b for b in blocks if b.names["v"] == name)
    v = deltas[name]
    groups = sorted(set((v.idx // 64).tolist()))
    seen = {}
    o_layer = model.get_submodule(b.names["o"])
    hook = o_layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach().clone()))
    dt.set_active(model, "default")
    with torch.no_grad():
        for d in deltas.values():
            d.D.zero_()
        logits(model, smollm_batch)
        clean = seen["x"]
        v.D.normal_(0, 0.5)
        logits(model, smollm_batch)
    hook.remove()
    changed = ((seen["x"] - clean).abs().amax(dim=(0, 1)) > 1e-6).view(9, 64).any(1)
    expected = torch.zeros(9, dtype=torch.bool)
    for g in groups:
        expected[g * 3:(g + 1) * 3] = True
    assert torch.equal(changed, expected)


def test_s2ft_selection_strategies_and_allocation(minilm_dir, sst2_rows):
    model = make_minilm(minilm_dir)
    blocks = find_blocks(model)
    # weight: the channels of down with the largest column norms, over all layers at once
    dt.attach(model, dt.S2FT(o_ratio=0, d_ratio=0.05, selection="weight", targets=["output.dense"]), name="w")
    norms = torch.stack([model.get_submodule(b.names["down"]).weight.pow(2).sum(0) for b in blocks])
    top = set(torch.topk(norms.reshape(-1), int(6 * 1536 * 0.05)).indices.tolist())
    got = {i * 1536 + j for i, b in enumerate(blocks)
           for j in (dt.deltas(model, "w")[b.names["down"]].idx.tolist() if b.names["down"] in dt.deltas(model, "w")
                     else [])}
    assert got == top
    # per-layer allocation: the same count in every block
    dt.attach(model, dt.S2FT(o_ratio=0.25, d_ratio=0, allocation="layer"), name="layer")
    assert [d.idx.numel() // 32 for d in dt.deltas(model, "layer").values()] == [3] * 6
    # random selection is reproducible from the seed
    a = dt.attach(make_minilm(minilm_dir), dt.S2FT(seed=3))
    b = dt.attach(make_minilm(minilm_dir), dt.S2FT(seed=3))
    assert all(torch.equal(x.idx, y.idx) for x, y in zip(dt.deltas(a, "default").values(),
                                                        dt.deltas(b, "default").values()))
    # activation and gradient selection use calibration batches and differ from random
    data = sst2_batches(minilm_dir, sst2_rows, n=2)
    with pytest.raises(ValueError, match="calibration"):
        dt.attach(make_minilm(minilm_dir), dt.S2FT(selection="gradient"))
    picks = {}
    for sel in ("activation", "gradient"):
        m = dt.attach(make_minilm(minilm_dir), dt.S2FT(o_ratio=0.1, d_ratio=0.02, selection=sel), data=data)
        picks[sel] = {n: d.idx.tolist() for n, d in dt.deltas(m, "default").items()}
        assert sum(len(v) for v in picks[sel].values()) == int(6 * 12 * 0.1) * 32 + int(6 * 1536 * 0.02)
        assert not any(p.requires_grad for n, p in m.named_parameters() if ".deltas." not in n)
    assert picks["activation"] != picks["gradient"]


def test_s2ft_trains_merges_saves_and_exports(minilm_dir, sst2_rows, minilm_batch, tmp_path):
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.S2FT(v_ratio=0.1, o_ratio=0.1, u_ratio=0.02, d_ratio=0.02, modules_to_save=["classifier"]))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "deltas" not in n}
    train_loop(model, sst2_batches(minilm_dir, sst2_rows), 4)
    out = logits(model, minilm_batch)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)  # base untouched
    dt.merge(model)
    torch.testing.assert_close(logits(model, minilm_batch), out, rtol=1e-5, atol=1e-5)
    dt.unmerge(model)
    dt.save(model, tmp_path / "s2ft")
    fresh = dt.load(make_minilm(minilm_dir, seed=5), tmp_path / "s2ft")
    torch.testing.assert_close(logits(fresh, minilm_batch), out, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="rank"):
        dt.save(model, tmp_path / "peft", format="peft")
    with pytest.warns(UserWarning, match="truncated SVD"):
        dt.save(model, tmp_path / "peft", format="peft", rank=4)
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(make_minilm(minilm_dir, seed=5), tmp_path / "peft").eval()
    approx = logits(peft_model, minilm_batch)
    assert (approx - out).abs().max() < (logits(make_minilm(minilm_dir), minilm_batch) - out).abs().max()


# -- SpIEL ------------------------------------------------------------------------------------------------------
def test_sparse_forward_gradients_and_observer_equal_a_dense_reference(minilm_dir):
    W, b = _real_weight(minilm_dir)
    torch.manual_seed(0)
    idx = torch.randperm(W.numel())[:3000]
    d = dt.SparseDelta(*W.shape, idx)
    with torch.no_grad():
        d.values.normal_(0, 0.05)
    x = torch.randn(11, W.shape[1], requires_grad=True)
    dense = d.dense().detach().requires_grad_(True)
    gx_ref, gdense = _grads(lambda: F.linear(x, W + dense, b), x, dense)
    seen = []
    for path in ("fused", "generic"):
        d.observer = seen.append
        def ours():
            if path == "fused":
                return sparse_linear(x, W, b, d.values, d.idx, d.observer)
            return d.add_to(F.linear(x, W, b), x, inplace=False)
        torch.testing.assert_close(ours(), F.linear(x, W + dense, b), rtol=1e-5, atol=1e-5)
        seen.clear()
        gx, gv = _grads(ours, x, d.values)
        _close(gx, gx_ref)
        _close(gv, gdense.reshape(-1)[idx])  # only the active entries
        assert len(seen) == 1
        _close(seen[0], gdense)  # the observer sees the dense gradient


def test_spiel_budget_regrowth_and_optimizer_reset(minilm_dir, sst2_rows, minilm_batch):
    model = make_minilm(minilm_dir)
    total = sum(p.numel() for p in model.parameters())
    method = dt.SpIEL(density=0.002, targets=["query", "value", "intermediate.dense"], reselection_steps=4,
                      accumulation_steps=2, modules_to_save=["classifier"])
    dt.attach(model, method)
    deltas = dt.deltas(model, "default")
    budget = {n: d.idx.numel() for n, d in deltas.items() if isinstance(d, dt.SparseDelta)}
    assert abs(sum(budget.values()) - 0.002 * total) <= len(budget)  # density relative to all parameters
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "deltas" not in n}
    history = []
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    dt.begin(model, 12)

    def check(t):
        for n, d in deltas.items():
            if isinstance(d, dt.SparseDelta):
                assert d.idx.numel() == budget[n] and torch.unique(d.idx).numel() == budget[n]
                history.append((t, n, d.idx.clone(), d.values.detach().clone(), opt.state[d.values]["exp_avg"].clone()))
    train_loop(model, sst2_batches(minilm_dir, sst2_rows), 12, opt=opt, after=check)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    by_step = {(t, n): (i, v, m) for t, n, i, v, m in history}
    name = next(iter(budget))
    i1, v1, m1 = by_step[(1, name)]  # step 1 ends the first accumulation window: everything replaced
    i0 = by_step[(0, name)][0]
    assert not set(i1.tolist()) & set(i0.tolist()) and (v1 == 0).all() and (m1 == 0).all()
    i5, v5, m5 = by_step[(5, name)]  # second reselection: p = 0.2 (1 - 5/12) of the entries swap
    i4 = by_step[(4, name)][0]
    new = ~torch.isin(i5, i4)
    assert int(new.sum()) == int(0.2 * (1 - 5 / 12) * budget[name])
    assert (v5[new] == 0).all() and (m5[new] == 0).all() and (m5[~new] != 0).any()
    # training moved the weights only at the active entries: the merged update is zero elsewhere
    out = logits(model, minilm_batch)
    for n, d in deltas.items():
        if isinstance(d, dt.SparseDelta):
            nz = (d.dense() != 0).reshape(-1).nonzero().reshape(-1)
            assert set(nz.tolist()) <= set(d.idx.tolist())
    dt.merge(model)
    torch.testing.assert_close(logits(model, minilm_batch), out, rtol=1e-5, atol=1e-5)
    dt.unmerge(model)  # back to the pretrained weights, up to float32 rounding of (W + dW) - dW
    for n, p in model.named_parameters():
        if n in base:
            torch.testing.assert_close(p, base[n], rtol=0, atol=1e-6)


def test_spiel_regrows_the_largest_accumulated_gradients(minilm_dir, sst2_rows):
    model = make_minilm(minilm_dir)
    for m in model.modules():  # the same gradients in the reference passes and the training loop
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    # reselect every 3 steps after watching 3 steps; no dt.begin, so the rate stays at replace_rate
    dt.attach(model, dt.SpIEL(num_params=600, targets=["layer.0.attention.self.query"], reselection_steps=3,
                              accumulation_steps=3, replace_rate=0.5))
    d = next(iter(dt.deltas(model, "default").values()))
    batches = sst2_batches(minilm_dir, sst2_rows, n=3)

    def reference():
        """Candidates (the top-k |G| of the first backward among inactive entries) and their summed gradient."""
        grads, keep = [], d.observer
        d.observer = grads.append
        for bt in batches:
            model(**bt).loss.backward()
        d.observer = keep
        model.zero_grad()
        first = grads[0].reshape(-1).abs().clone()
        first[d.idx] = -1
        cand = torch.topk(first, 600).indices
        return cand, sum(g.reshape(-1)[cand] for g in grads)

    cand, _ = reference()  # first reselection replaces every entry by the candidates (lr = 0: values stay 0)
    train_loop(model, batches, 3, lr=0.0)
    assert set(d.idx.tolist()) == set(cand.tolist()) and (d.values == 0).all()
    with torch.no_grad():
        d.values.copy_(torch.randn(600, generator=torch.Generator().manual_seed(0)) * 1e-3)
    cand, acc = reference()
    drop = torch.topk(d.values.abs(), 300, largest=False).indices  # second: half of the entries swap
    expected = d.idx.clone()
    expected[drop] = cand[torch.topk(acc.abs(), 300).indices]
    kept = d.values.detach().clone()
    train_loop(model, batches, 3, lr=0.0)
    assert torch.equal(d.idx, expected)
    assert (d.values[drop] == 0).all() and int(d.values.count_nonzero()) == 300
    keep_mask = torch.ones(600, dtype=torch.bool)
    keep_mask[drop] = False
    assert torch.equal(d.values[keep_mask], kept[keep_mask])


def test_sparse_composition_adds_and_trains_on_top_of_a_frozen_adapter(minilm_dir, sst2_rows, minilm_batch, tmp_path):
    model = make_minilm(minilm_dir)
    targets = ["query", "value"]
    dt.attach(model, dt.SpIEL(density=0.001, targets=targets, regrow="none", seed=1), name="lang")
    train_loop(model, sst2_batches(minilm_dir, sst2_rows), 3)
    lang = {n: d.values.detach().clone() for n, d in dt.deltas(model, "lang").items()}
    dt.attach(model, dt.SpIEL(density=0.001, targets=targets, seed=2), name="task")
    dt.set_active(model, ["lang", "task"], trainable="task")
    assert not any(d.values.requires_grad for d in dt.deltas(model, "lang").values())
    train_loop(model, sst2_batches(minilm_dir, sst2_rows, offset=40), 3)
    assert all(torch.equal(d.values, lang[n]) for n, d in dt.deltas(model, "lang").items())
    # both active: the output is the base weights plus the sum of the two dense deltas
    both = logits(model, minilm_batch)
    plain = make_minilm(minilm_dir)
    with torch.no_grad():
        for n, d in dt.deltas(model, "lang").items():
            plain.get_submodule(n).weight += d.dense() + dt.deltas(model, "task")[n].dense()
    torch.testing.assert_close(both, logits(plain, minilm_batch), rtol=1e-5, atol=1e-5)
    # switching: one at a time, and back
    dt.set_active(model, "lang")
    only_lang = logits(model, minilm_batch)
    assert not torch.allclose(only_lang, both)
    dt.set_active(model, ["lang", "task"])
    torch.testing.assert_close(logits(model, minilm_batch), both)
    dt.save(model, tmp_path / "both")
    again = dt.load(make_minilm(minilm_dir), tmp_path / "both")
    dt.set_active(again, ["lang", "task"])
    torch.testing.assert_close(logits(again, minilm_batch), both, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="not among the active"):
        dt.set_active(model, "lang", trainable="task")


def test_sparse_checkpoint_refuses_a_base_it_does_not_fit(minilm_dir, smollm_dir, tmp_path):
    model = dt.attach(make_minilm(minilm_dir), dt.SpIEL(density=0.001, targets=["query"]))
    dt.save(model, tmp_path / "a")
    with pytest.raises(ValueError, match="does not fit"):
        dt.load(make_smollm(smollm_dir), tmp_path / "a")
    with pytest.raises(ValueError, match="indices must be in"):
        dt.SparseDelta(4, 4, torch.tensor([0, 16]))
    with pytest.raises(ValueError, match="unique"):
        dt.SlicedDelta(4, 4, torch.tensor([1, 1]), 0)
    with pytest.raises(ValueError, match="ratios"):
        dt.attach(make_minilm(minilm_dir), dt.S2FT(o_ratio=0, d_ratio=0))


def test_s2ft_example_config_runs_from_the_cli_and_exports(tmp_path, capsys):
    """The GSM8K example on SmolLM2 (gradient selection from the first training batches), shortened; then the
    exported PEFT LoRA loads in PEFT and approximates the adapter."""
    import json as _json

    import yaml

    from deltatune.cli import main

    config = yaml.safe_load((ROOT / "examples" / "gsm8k_s2ft.yaml").read_text())
    config["data"].update(train=str(DATA / "gsm8k" / "train.jsonl"), eval=str(DATA / "gsm8k" / "test.jsonl"),
                          max_train_rows=16, max_eval_rows=4, max_length=96)
    config["train"].update(batch_size=4, max_steps=2, eval_every=None, progress=False)
    config["output_dir"] = str(tmp_path / "out")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    saved = _json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["method"]["selection"] == "gradient"
    assert {s["structure"] for s in saved["modules"].values()} == {"sliced"}
    assert main(["export", str(tmp_path / "out" / "adapter"), "--to", "peft", str(tmp_path / "peft")]) == 2
    assert main(["export", str(tmp_path / "out" / "adapter"), "--to", "peft", "--rank", "8",
                 str(tmp_path / "peft")]) == 0
    assert "truncated SVD; relative error mean" in capsys.readouterr().out
    peft_cfg = _json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == 8


def test_ltsft_keeps_the_entries_that_moved_most_and_retrains_them_from_zero(minilm_dir, sst2_rows, minilm_batch):
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.LTSFT(num_params=3000, targets=["query", "value"], modules_to_save=["classifier"]))
    deltas = {n: d for n, d in dt.deltas(model, "default").items() if isinstance(d, dt.SparseDelta)}
    assert all(d.idx.numel() == d.out_features * d.in_features for d in deltas.values())  # phase 1: dense
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    with pytest.raises(ValueError, match="full_steps"):
        dt.step(model, opt)  # neither full_steps nor dt.begin: phase 1 has no end
    dt.begin(model, 6)  # phase 1 = the first 3 steps
    batches = sst2_batches(minilm_dir, sst2_rows)
    model.train()
    for t in range(6):
        model(**batches[t % len(batches)]).loss.backward()
        opt.step()
        if t == 2:  # what the selection sees
            moved = {n: d.values.detach().abs().clone() for n, d in deltas.items()}
        changed = dt.step(model, opt)
        assert changed == (t == 2)
        if t == 2:
            flat = torch.cat(list(moved.values()))
            threshold = torch.topk(flat, 3000).values.min()
            assert sum(d.idx.numel() for d in deltas.values()) == 3000
            for n, d in deltas.items():  # Adam's first steps move many entries by exactly lr * steps: ties
                kept = torch.zeros_like(moved[n], dtype=torch.bool)
                kept[d.idx] = True
                assert (moved[n][kept] >= threshold).all() and kept[moved[n] > threshold].all()
                assert (d.values == 0).all() and d.values not in opt.state
        opt.zero_grad()
    assert all(opt.state[d.values]["step"] == 3 for d in deltas.values())  # fresh optimizer state in phase 2
    assert dt.controller_metrics(model) == {"phase": 2.0}
    out = logits(model.eval(), minilm_batch)
    dt.merge(model)
    torch.testing.assert_close(logits(model, minilm_batch), out, rtol=1e-5, atol=1e-5)
