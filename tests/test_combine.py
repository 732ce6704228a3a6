"""Merge arithmetic (task arithmetic, magnitude pruning, TIES, DARE) on small hand-checkable tensors."""
from __future__ import annotations

import pytest
import torch

from deltatune.combine import dare, dare_drop, disjoint_mean, elect_sign, magnitude_prune, task_arithmetic, ties
from helpers import logits, make_minilm


def test_task_arithmetic_and_magnitude_pruning_by_hand():
    a = torch.tensor([1.0, -2.0, 3.0, -4.0, 0.5])
    b = torch.tensor([-1.0, 1.0, 1.0, 1.0, 1.0])
    torch.testing.assert_close(task_arithmetic([a, b], [0.5, -2.0]), torch.tensor([2.5, -3.0, -0.5, -4.0, -1.75]))
    torch.testing.assert_close(magnitude_prune(a, 0.4), torch.tensor([0.0, 0.0, 3.0, -4.0, 0.0]))
    torch.testing.assert_close(magnitude_prune(a, 1.0), a)
    assert int((magnitude_prune(torch.arange(10.0), 0.2) != 0).sum()) == 2  # no float off-by-one
    with pytest.raises(ValueError, match="density"):
        magnitude_prune(a, 0.0)
    with pytest.raises(ValueError, match="3 weights for 2"):
        task_arithmetic([a, b], [1, 2, 3])


def test_ties_trims_elects_signs_and_takes_the_disjoint_mean():
    t1 = torch.tensor([4.0, -1.0, 2.0, 0.1])
    t2 = torch.tensor([-1.0, -3.0, 2.0, -0.2])
    t3 = torch.tensor([-1.0, 2.0, -6.0, 0.3])
    # density 0.75 keeps 3 of 4 entries per task: t1 drops 0.1, t2 drops -0.2, t3 drops 0.3
    trimmed = [magnitude_prune(t, 0.75) for t in (t1, t2, t3)]
    torch.testing.assert_close(trimmed[0], torch.tensor([4.0, -1.0, 2.0, 0.0]))
    sign = elect_sign(trimmed)  # sums: 2, -2, -2, 0
    torch.testing.assert_close(sign, torch.tensor([1.0, -1.0, -1.0, 0.0]))
    # entry 0: only t1 agrees -> 4; entry 1: t1, t2 agree -> -2; entry 2: only t3 -> -6; entry 3: nobody -> 0
    torch.testing.assert_close(ties([t1, t2, t3], density=0.75), torch.tensor([4.0, -2.0, -6.0, 0.0]))
    # weights enter the election and the mean; with t2 weighted 3 the sums are 0, -8, 2, 0: entry 0 has no sign,
    # entry 1 is (-1 - 9) / (1 + 3), entry 2 flips to the positive side, (2 + 6) / (1 + 3)
    torch.testing.assert_close(ties([t1, t2, t3], [1.0, 3.0, 1.0], density=0.75),
                               torch.tensor([0.0, -2.5, 2.0, 0.0]))
    torch.testing.assert_close(disjoint_mean([t1, t2], torch.tensor([1.0, -1.0, 1.0, 1.0]), [2.0, 1.0]),
                               torch.tensor([4.0, (2 * -1.0 + 1 * -3.0) / 3, 2.0, 0.1]))


def test_dare_drops_at_the_given_rate_rescales_and_combines():
    tau = torch.ones(100_000)
    g = torch.Generator().manual_seed(0)
    dropped = dare_drop(tau, 0.25, g)
    kept = dropped != 0
    assert abs(float(kept.float().mean()) - 0.25) < 0.01
    assert torch.all(dropped[kept] == 4.0)  # survivors rescaled by 1 / density
    assert abs(float(dropped.mean()) - 1.0) < 0.05  # unbiased
    a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1.0, 2.0, -1.0])
    torch.testing.assert_close(dare([a, b], [1.0, 0.5], density=1.0), a + 0.5 * b)  # density 1 keeps everything
    torch.testing.assert_close(dare([a, b], density=1.0, consensus="ties"), torch.tensor([1.0, 0.0, 3.0]))
    same = [dare([a, b], density=0.5, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    torch.testing.assert_close(same[0], same[1])
    with pytest.raises(ValueError, match="consensus"):
        dare([a, b], consensus="mean")


# -- dt.combine on real MiniLM adapters ------------------------------------------------------------------------------
def _model_with_adapters(minilm_dir):
    import deltatune as dt

    model = make_minilm(minilm_dir)
    g = torch.Generator().manual_seed(0)
    specs = {"lora4": dt.LoRA(r=4, targets=["query", "value"]),
             "lora8": dt.LoRA(r=8, targets=["query", "key"], rank_pattern={"key": 2}),
             "s2ft": dt.S2FT(v_ratio=0.1, o_ratio=0.1, d_ratio=0.02),
             "spiel": dt.SpIEL(density=0.001, targets=["intermediate.dense", "value"]),
             "oft": dt.OFT(block_size=32, targets=["value"])}
    for name, method in specs.items():
        dt.attach(model, method, name=name, activate=False)
        with torch.no_grad():
            for d in dt.deltas(model, name).values():
                for p in d.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model, list(specs)


def test_combine_sums_mixed_structures_exactly_with_any_ranks_and_signs(minilm_dir, minilm_batch, tmp_path):
    import deltatune as dt
    from deltatune.deltas import DenseDelta, LowRankDelta

    model, names = _model_with_adapters(minilm_dir)
    weights = [1.0, -0.5, 0.7, 1.0, 2.0]
    expected = {}
    for n, w in zip(names, weights):
        for mod, d in dt.deltas(model, n).items():
            expected[mod] = expected.get(mod, 0) + w * d.dense().detach()
    errors = dt.combine(model, names, weights=weights, name="sum")
    assert set(errors.values()) == {0.0}
    got = dt.deltas(model, "sum")
    assert set(got) == set(expected)
    for mod, dW in expected.items():
        torch.testing.assert_close(got[mod].dense().detach(), dW, rtol=1e-5, atol=1e-6)
    # pure low-rank layers stay low-rank (factors side by side), the others are dense
    q = "bert.encoder.layer.0.attention.self.query"
    assert isinstance(got[q], LowRankDelta) and got[q].r == 4 + 8  # query: lora4 + lora8 only
    assert isinstance(got["bert.encoder.layer.0.attention.self.value"], DenseDelta)
    # one adapter with weight 1 gives its own outputs; the combination saves and loads like any adapter
    dt.combine(model, ["lora4"], name="one")
    dt.set_active(model, "lora4")
    own = logits(model, minilm_batch)
    dt.set_active(model, "one")
    torch.testing.assert_close(logits(model, minilm_batch), own)
    dt.save(model, tmp_path / "one", names=["one"])
    fresh = dt.load(make_minilm(minilm_dir), tmp_path / "one")
    torch.testing.assert_close(logits(fresh, minilm_batch), own)


def test_combine_ties_dare_and_refactorization(minilm_dir):
    import deltatune as dt

    model, names = _model_with_adapters(minilm_dir)
    pair = ["lora4", "s2ft"]
    dt.combine(model, pair, method="ties", density=0.3, name="ties")
    mod = "bert.encoder.layer.1.attention.self.value"
    taus = [dt.deltas(model, n)[mod].dense().detach() for n in pair]
    torch.testing.assert_close(dt.deltas(model, "ties")[mod].dense().detach(), ties(taus, density=0.3))
    dt.combine(model, pair, method="dare", density=0.5, seed=3, name="dare")
    dense = dt.deltas(model, "dare")[mod].dense().detach()
    assert 0.3 < float((dense != 0).float().mean()) < 0.9  # random drops over the union of the two supports
    # re-factorization to a LoRA: the error falls with the rank, and an energy threshold picks the rank
    errs = [max(dt.combine(model, names, rank=r, name=f"r{r}").values()) for r in (2, 8, 32)]
    assert errs[0] > errs[1] > errs[2] > 0
    e = dt.combine(model, ["lora4", "lora8"], energy=1.0, name="energy")
    assert max(e.values()) < 1e-5  # two LoRAs: their sum has rank <= 12, kept whole
    with pytest.raises(ValueError, match="unknown combine method"):
        dt.combine(model, pair, method="mean")


def test_sum_keeps_sparse_and_block_structures_on_the_union_of_their_supports():
    from deltatune.combine.merge import combine_deltas
    from deltatune.deltas import DenseDelta, LowRankDelta, SlicedDelta, SparseDelta

    g = torch.Generator().manual_seed(1)

    def filled(d):
        with torch.no_grad():
            for p in d.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        return d

    sp1 = filled(SparseDelta(6, 5, torch.tensor([0, 3, 7, 29])))
    sp2 = filled(SparseDelta(6, 5, torch.tensor([3, 8, 29])))
    rows1 = filled(SlicedDelta(6, 5, torch.tensor([4, 1]), axis=0))
    rows2 = filled(SlicedDelta(6, 5, torch.tensor([1, 2]), axis=0))
    cols = filled(SlicedDelta(6, 5, torch.tensor([0]), axis=1))
    lora = filled(LowRankDelta(6, 5, 2, 0.5))
    adapters = [{"sp": sp1, "rows": rows1, "mix": rows1, "lr": sp1},
                {"sp": sp2, "rows": rows2, "mix": cols, "lr": lora}]
    built, errors, _, _ = combine_deltas(adapters, weights=[2.0, -1.0])
    for mod, d in built.items():
        want = 2.0 * adapters[0][mod].dense() - 1.0 * adapters[1][mod].dense()
        torch.testing.assert_close(d.dense().detach(), want.detach(), msg=mod)
    assert isinstance(built["sp"], SparseDelta) and built["sp"].idx.tolist() == [0, 3, 7, 8, 29]
    assert isinstance(built["rows"], SlicedDelta) and built["rows"].idx.tolist() == [1, 2, 4]
    assert isinstance(built["mix"], DenseDelta)  # a row block plus a column block is no single block
    assert isinstance(built["lr"], DenseDelta)
    assert set(errors.values()) == {0.0}
