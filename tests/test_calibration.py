"""The calibration pass: per-layer input statistics from forward hooks, on real MiniLM weights and SST-2 text."""
from __future__ import annotations

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
