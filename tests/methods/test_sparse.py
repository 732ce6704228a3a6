"""SpIEL and LT-SFT: budgets, regrowth, composition, checkpoints."""
from __future__ import annotations

import pytest
import torch
from helpers import logits, make_minilm, make_smollm, sst2_batches, train_loop

import deltatune as dt


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
