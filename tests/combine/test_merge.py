"""dt.combine on real adapters: mixed structures, TIES/DARE, export, the merge CLI."""
from __future__ import annotations

import pytest
import torch
import yaml
from helpers import logits, make_minilm, mixed_structures, randomize, state_without
from safetensors.torch import save_file

import deltatune as dt
from deltatune.cli import main
from deltatune.combine import ties


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


def test_combined_adapters_export_to_peft_with_matching_outputs(minilm_dir, minilm_batch, tmp_path):
    from peft import PeftModel

    model = mixed_structures(minilm_dir)
    dt.combine(model, ["lora", "oft"], weights=[1.0, -0.5], name="low")  # lora (query, value) + oft (query)
    dt.combine(model, ["lora", "spiel", "s2ft"], weights=[0.5, 1.0, 2.0], name="mix")
    for name, kw in (("low", {"energy": 1.0}), ("mix", {"energy": 1.0})):
        dt.set_active(model, name)
        ours = logits(model, minilm_batch)
        dt.save(model, tmp_path / name, names=[name], format="peft", **kw)
        ref = PeftModel.from_pretrained(make_minilm(minilm_dir), tmp_path / name).eval()
        torch.testing.assert_close(logits(ref, minilm_batch), ours, atol=1e-4, rtol=0, msg=name)
    # two LoRAs sum exactly as one LoRA of the summed ranks: PEFT loads it without any rank or energy
    dt.attach(model, dt.LoRA(r=2, targets=["query"]), name="lora2", activate=False)
    randomize(model, "lora2", seed=9)
    dt.combine(model, ["lora", "lora2"], weights=[1.0, 3.0], name="cat")
    dt.set_active(model, "cat")
    dt.save(model, tmp_path / "cat", names=["cat"], format="peft")
    cfg = yaml.safe_load((tmp_path / "cat" / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and set(cfg["rank_pattern"].values()) == {4}  # query 4 + 2; value 4 alone
    ref = PeftModel.from_pretrained(make_minilm(minilm_dir), tmp_path / "cat").eval()
    torch.testing.assert_close(logits(ref, minilm_batch), logits(model, minilm_batch), atol=1e-5, rtol=0)
    # modules kept whole (heads) combine as whole modules, bias included: W0 + sum_i w_i (W'_i - W0)
    for i in range(2):
        dt.attach(model, dt.LoRA(r=2, targets=["query"], modules_to_save=["classifier"]), name=f"head{i}",
                  activate=False)
        randomize(model, f"head{i}", seed=20 + i)
    heads = [dt.deltas(model, f"head{i}")["classifier"] for i in range(2)]
    dt.combine(model, ["head0", "head1"], weights=[0.25, 0.75], rank=1, name="heads")
    got = dt.deltas(model, "heads")["classifier"]
    torch.testing.assert_close(got.weight, 0.25 * heads[0].weight + 0.75 * heads[1].weight)
    torch.testing.assert_close(got.bias, 0.25 * heads[0].bias + 0.75 * heads[1].bias)
    # an update relative to the base weight cannot be exported from a layer that has other adapters merged in
    dt.set_active(model, "lora")
    dt.merge(model, "lora")
    with pytest.raises(ValueError, match="merged into its weight"):
        dt.save(model, tmp_path / "bad", names=["oft"], format="peft", rank=4)


def test_merge_cli_combines_saved_adapters_like_dt_combine(minilm_dir, minilm_batch, tmp_path, capsys):
    model = mixed_structures(minilm_dir)
    save_file(state_without(make_minilm(minilm_dir)), tmp_path / "base.safetensors")
    for name in ("lora", "spiel", "oft"):
        dt.save(model, tmp_path / name, names=[name])
    dt.combine(model, ["lora", "spiel", "oft"], weights=[1.0, -1.0, 0.5], name="want")
    dt.set_active(model, "want")
    want = logits(model, minilm_batch)
    spec = {"method": "sum", "adapters": [{"path": "lora"}, {"path": "spiel", "weight": -1.0},
                                          {"path": "oft", "weight": 0.5}],
            "base": "base.safetensors", "output": "merged", "name": "merged"}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(spec))
    assert main(["merge", str(tmp_path / "merge.yaml")]) == 0, capsys.readouterr().err
    fresh = dt.load(make_minilm(minilm_dir), tmp_path / "merged")
    torch.testing.assert_close(logits(fresh, minilm_batch), want, atol=1e-5, rtol=0)
    # TIES re-factorized to rank 8 and written straight to PEFT
    spec.update(method="ties", density=0.3, rank=8, format="peft", output="ties")
    (tmp_path / "ties.yaml").write_text(yaml.safe_dump(spec))
    assert main(["merge", str(tmp_path / "ties.yaml")]) == 0
    assert "relative error" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "ties" / "adapter_config.json").read_text())["r"] == 8
    # bad configs say what to fix
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"adapters": ["lora"], "output": "o", "mehtod": "sum"}))
    assert main(["merge", str(tmp_path / "bad.yaml")]) == 2 and "unknown keys ['mehtod']" in capsys.readouterr().err
    (tmp_path / "nobase.yaml").write_text(yaml.safe_dump({"adapters": ["oft"], "output": "o"}))
    assert main(["merge", str(tmp_path / "nobase.yaml")]) == 2
    assert "relative to the base model's weight" in capsys.readouterr().err
    (tmp_path / "str.yaml").write_text(yaml.safe_dump({"adapters": "lora", "output": "o"}))
    assert main(["merge", str(tmp_path / "str.yaml")]) == 2 and "must be a list" in capsys.readouterr().err
    (tmp_path / "dense.yaml").write_text(yaml.safe_dump({"adapters": ["lora"], "output": "o", "method": "ties",
                                                         "format": "peft"}))
    assert main(["merge", str(tmp_path / "dense.yaml")]) == 2 and "'rank:'" in capsys.readouterr().err
