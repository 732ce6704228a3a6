"""Data-driven inits (CorDA, EVA) from calibration statistics."""
from __future__ import annotations

import pytest
import torch
from helpers import make_minilm, sst2_batches

import deltatune as dt
from deltatune.calibration import calibrate


TEXTS = {"size": 4, "labels": False, "max_length": None}  # batches of 4 sentences, untruncated, unlabelled


def test_corda_statistic_scales_each_sample_by_its_signed_maximum(minilm_dir, sst2_rows):
    model = make_minilm(minilm_dir)
    batches = sst2_batches(minilm_dir, sst2_rows, n=1, **TEXTS)
    cal = calibrate(model, batches, targets=["layer.1.attention.self.query"], stats=("corda",), verbose=False)
    stat = cal["bert.encoder.layer.1.attention.self.query"]
    with torch.no_grad():
        h = model(**batches[0], output_hidden_states=True).hidden_states[1].double()
    h = h * batches[0]["attention_mask"].unsqueeze(-1)
    want = sum((x / x.max().abs()).t() @ (x / x.max().abs()) for x in h) / h.shape[0]
    torch.testing.assert_close(stat.corda_matrix(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown statistics"):
        calibrate(model, batches, stats=("fisher",))


# -- CorDA and EVA initializations ------------------------------------------------------------------------------------
def test_corda_decomposition_reconstructs_the_weight_and_initializes_a_residual(minilm_dir, sst2_rows, minilm_batch):
    import warnings

    from deltatune.methods.datainit import corda_decompose

    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 9, generator=g, dtype=torch.float64)
    X = torch.randn(30, 9, generator=g, dtype=torch.float64)
    U, S, Vt = corda_decompose(W, X.t() @ X / 30)
    torch.testing.assert_close(U @ torch.diag(S) @ Vt, W)  # exact before truncation (Vt is not orthonormal)
    model = make_minilm(minilm_dir)
    before = model(**minilm_batch).logits.detach()
    batches = sst2_batches(minilm_dir, sst2_rows, n=3, **TEXTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for mode in ("ipa", "kpa"):
            dt.attach(model, dt.CorDA(r=4, init=f"corda_{mode}", targets=["query", "value"]), data=batches,
                      name=mode)
    q = "bert.encoder.layer.2.attention.self.query"
    stat = calibrate(model, batches, targets=[q], stats=("corda",), verbose=False)[q]
    W = dict(dt.model.base_modules(model))[q].weight.detach()
    U, S, Vt = corda_decompose(W, stat.corda_matrix())
    for mode, sl in (("ipa", slice(0, 4)), ("kpa", slice(S.numel() - 4, S.numel()))):
        d = dt.deltas(model, mode)[q]
        torch.testing.assert_close((d.scale * d.B0 @ d.A0).double(), U[:, sl] @ torch.diag(S[sl]) @ Vt[sl],
                                   rtol=1e-4, atol=1e-5)
        assert d.lowrank()[0].shape[1] == 8  # saved as a plain LoRA of rank 2r on the unmodified base
        dt.set_active(model, mode)
        torch.testing.assert_close(model(**minilm_batch).logits.detach(), before)  # residual: no change at init
    with pytest.raises(ValueError, match="needs calibration data"):
        dt.attach(model, dt.CorDA(r=2, targets=["query"]), name="nodata")


def test_eva_takes_converged_principal_directions_and_redistributes_ranks(minilm_dir, sst2_rows, minilm_batch):
    import warnings

    from deltatune.methods.datainit import pca

    model = make_minilm(minilm_dir)
    before = model(**minilm_batch).logits.detach()
    batches = sst2_batches(minilm_dir, sst2_rows, n=16, **TEXTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the needed components converge on this fixed data set
        dt.attach(model, dt.EVA(r=4, targets=["query", "key", "value", "intermediate.dense"]), data=batches)
    deltas = dt.deltas(model, "default")
    ranks = {n: d.r for n, d in deltas.items()}
    assert sum(ranks.values()) <= 4 * 24 and max(ranks.values()) <= 8 and len(set(ranks.values())) > 1
    q = "bert.encoder.layer.1.attention.self.query"
    stat = calibrate(model, batches, targets=[q], stats=("cov", "mean"), verbose=False)[q]
    comps, ratios = pca(stat.cov_matrix(), stat.mean_vector(), 8)
    A = deltas[q].A.detach().double()
    cos = (A * comps[: A.shape[0]]).sum(1).abs()
    # A = the top principal directions of the layer's inputs (EVA stops once they are stable, before the last batch)
    assert float(cos[0]) > 0.99 and float(cos.min()) > 0.9
    assert float(deltas[q].B.abs().max()) == 0.0
    torch.testing.assert_close(model(**minilm_batch).logits.detach(), before)
    assert all(d.scale == 1.0 for d in deltas.values())  # alpha scaled with the rank: the scale stays alpha / r
