"""The calibration pass: per-layer input statistics from forward hooks, on real MiniLM weights and SST-2 text."""
from __future__ import annotations

import pytest
import torch
from helpers import make_minilm, randomize, sst2_batches

import deltatune as dt
from deltatune.calibration import calibrate, load_calibration

TEXTS = {"size": 4, "labels": False, "max_length": None}  # batches of 4 sentences, untruncated, unlabelled


def _direct(model, batches, layer):
    """``sum x x^T`` and ``sum x`` over the real tokens of hidden state ``layer`` (the input of its q, k, v)."""
    C, s, n = 0, 0, 0
    with torch.no_grad():
        for b in batches:
            h = model(**b, output_hidden_states=True).hidden_states[layer].double()
            x = h[b["attention_mask"].bool()]
            C, s, n = C + x.t() @ x, s + x.sum(0), n + x.shape[0]
    return C / n, s / n


def test_covariance_from_hooks_equals_a_direct_computation(minilm_dir, sst2_rows, tmp_path, capsys):
    model = make_minilm(minilm_dir)
    batches = sst2_batches(minilm_dir, sst2_rows, n=3, **TEXTS)
    assert any(int(b["attention_mask"].sum()) < b["attention_mask"].numel() for b in batches)  # padding present
    cal = calibrate(model, batches, targets=["query", "key", "value", "intermediate.dense"], stats=("cov", "mean"),
                    cache=tmp_path / "cal.safetensors")
    assert "statistics need at most" in capsys.readouterr().err
    for layer in (0, 3):
        C, mean = _direct(model, batches, layer)
        q = cal[f"bert.encoder.layer.{layer}.attention.self.query"]
        torch.testing.assert_close(q.cov_matrix(), C, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(q.mean_vector(), mean, rtol=1e-5, atol=1e-6)
        # q, k and v see one input: one shared statistic; the FFN input is another
        assert cal[f"bert.encoder.layer.{layer}.attention.self.value"] is q
        assert cal[f"bert.encoder.layer.{layer}.intermediate.dense"] is not q
    assert q.tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    # the cache is used instead of running again (an empty data set would fail)
    again = calibrate(model, [], targets=["query", "key", "value", "intermediate.dense"], stats=("cov",),
                      cache=tmp_path / "cal.safetensors")
    torch.testing.assert_close(again["bert.encoder.layer.3.attention.self.key"].cov_matrix(), q.cov_matrix())
    assert load_calibration(tmp_path / "cal.safetensors")["bert.encoder.layer.3.attention.self.key"].tokens == q.tokens
    # adapters on the model change nothing about the inputs the base layers see
    dt.attach(model, dt.LoRA(r=2, targets=["query", "value"]))
    randomize(model, "default", std=0.1)  # the adapter changes the hidden states; the hooks see the real inputs
    with_adapter = calibrate(model, batches, targets=["query"], verbose=False)
    torch.testing.assert_close(with_adapter["bert.encoder.layer.0.attention.self.query"].cov_matrix(),
                               _direct(model, batches, 0)[0], rtol=1e-5, atol=1e-6)


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
