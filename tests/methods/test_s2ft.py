"""S2FT: structured sparse selection on GQA models, strategies, training and export."""
from __future__ import annotations

import pytest
import torch
from helpers import logits, make_minilm, make_smollm, sst2_batches, train_loop

import deltatune as dt
from deltatune.targets import find_blocks


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
