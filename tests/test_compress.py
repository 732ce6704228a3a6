"""Low-rank compression of a pretrained model (plain, activation-aware and Fisher-weighted SVD), on real MiniLM."""
from __future__ import annotations

import pytest
import torch
from helpers import make_minilm, sst2_batches

import deltatune as dt
from deltatune.compress import (LowRankLinear, allocate, compress, damped_cholesky, factors_from, load_compressed,
                                weighted_svd)


def test_full_rank_factors_reproduce_the_weight_in_every_metric():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(7, 5, generator=g, dtype=torch.float64)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    L = damped_cholesky(X.t() @ X / 40)
    rows = torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    for left, right in ((None, None), (None, L), (rows, None)):
        U, S, Vh = weighted_svd(W, left, right)
        up, down = factors_from(U, S, Vh, 5, left, right)
        torch.testing.assert_close(up @ down, W)
    # activation-aware truncation minimizes the error on the data, plain SVD the weight error
    up_a, down_a = factors_from(*weighted_svd(W, None, L), 2, None, L)
    up_s, down_s = factors_from(*weighted_svd(W), 2)
    assert (X @ (W - up_a @ down_a).t()).norm() < (X @ (W - up_s @ down_s).t()).norm()
    assert (W - up_s @ down_s).norm() < (W - up_a @ down_a).norm()


def test_full_rank_factor_layers_reproduce_the_model(minilm_dir, sst2_rows):
    model = make_minilm(minilm_dir)
    batches = sst2_batches(minilm_dir, sst2_rows, n=1, labels=False, max_length=None)
    want = _logits(model, batches)
    cov = dt.calibrate(model, batches, targets=["intermediate.dense"], verbose=False)
    for name in [n for n in cov if n.endswith("intermediate.dense")]:
        layer = model.get_submodule(name)
        W = layer.weight.detach()
        L = damped_cholesky(cov[name].cov_matrix())
        up, down = factors_from(*weighted_svd(W, None, L), min(W.shape), None, L)
        new = LowRankLinear(W.shape[1], W.shape[0], min(W.shape), True)
        with torch.no_grad():
            new.up.weight.copy_(up)
            new.down.weight.copy_(down)
            new.up.bias.copy_(layer.bias)
        dt.layers.set_submodule(model, name, new)
    torch.testing.assert_close(_logits(model, batches), want, atol=1e-4, rtol=1e-4)


def test_allocation_meets_the_budget_and_favours_flat_spectra():
    shapes = {"steep": (100, 100), "flat": (100, 100)}
    spectra = {"steep": 0.5 ** torch.arange(100.0), "flat": torch.ones(100)}
    ranks = allocate(spectra, shapes, budget=30 * 200)
    assert sum(100 * 100 if k < 0 else k * 200 for k in ranks.values()) <= 30 * 200
    assert ranks["flat"] > ranks["steep"] > 0


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in batches])


def test_compression_meets_the_ratio_and_activation_aware_is_closer(minilm_dir, sst2_rows, tmp_path):
    batches = sst2_batches(minilm_dir, sst2_rows, n=2, labels=False, max_length=None)
    ref_model = make_minilm(minilm_dir)
    want = _logits(ref_model, batches)
    total = sum(p.numel() for p in ref_model.parameters())
    errors = {}
    for method in ("svd", "activation", "fisher"):
        model = make_minilm(minilm_dir)
        data = sst2_batches(minilm_dir, sst2_rows, n=2, max_length=None) if method == "fisher" else batches
        ranks = compress(model, ratio=0.1, method=method, data=data, targets=["intermediate.dense", "output.dense"])
        now = sum(p.numel() for p in model.parameters())
        assert 0.895 * total <= now <= 0.9 * total, method  # the budget is met, and used
        assert any(isinstance(m, LowRankLinear) for m in model.modules())
        assert len(set(k for k in ranks.values() if k >= 0)) > 1  # ranks differ between layers
        errors[method] = float((_logits(model, batches) - want).norm() / want.norm())
        if method == "activation":
            model.save_pretrained(tmp_path / "compressed")
            again = load_compressed(tmp_path / "compressed")
            torch.testing.assert_close(_logits(again, batches), _logits(model, batches))
            # any adapter attaches to the factor linears and trains from there
            dt.attach(again, dt.LoRA(r=2, targets="all-linear"))
            assert any(n.endswith("intermediate.dense.down") for n in dt.deltas(again, "default"))
    assert errors["activation"] < errors["svd"]
    with pytest.raises(ValueError, match="needs calibration data"):
        compress(make_minilm(minilm_dir), ratio=0.1, method="activation")
    with pytest.raises(ValueError, match="more than the"):
        compress(make_minilm(minilm_dir), ratio=0.9, method="svd", targets=["query"])


def test_compress_cli_writes_a_model_that_loads_back(smollm_dir, tmp_path, capsys):
    import yaml
    from transformers import AutoModelForCausalLM

    from deltatune.cli import main

    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "model": {"path": str(smollm_dir)}, "ratio": 0.05, "method": "svd", "targets": ["down_proj"],
        "output_dir": "small"}))
    assert main(["compress", str(tmp_path / "run.yaml")]) == 0, capsys.readouterr().err
    assert "layers factored" in capsys.readouterr().out
    model = load_compressed(tmp_path / "small")
    before = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(smollm_dir).parameters())
    after = sum(p.numel() for p in model.parameters())
    assert 0.945 * before <= after <= 0.95 * before
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"model": {"path": "smollm2"}, "ratio": 0.1,
                                                       "method": "fisher", "output_dir": "x"}))
    assert main(["compress", str(tmp_path / "bad.yaml")]) == 2 and "needs calibration" in capsys.readouterr().err
