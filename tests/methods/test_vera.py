"""VeRA against PEFT's VeRA."""
from __future__ import annotations

import torch
from helpers import logits, make_minilm

import deltatune as dt


Q_NAME = "bert.encoder.layer.0.attention.self.query"


def test_vera_forward_equals_peft_vera_for_identical_parameters(minilm_dir, minilm_batch):
    from peft import VeraConfig, get_peft_model

    peft = get_peft_model(make_minilm(minilm_dir), VeraConfig(r=16, target_modules=["query", "value"],
                                                              projection_prng_key=5))
    ours = dt.attach(make_minilm(minilm_dir), dt.VeRA(r=16, targets=["query", "value"]))
    d0 = dt.deltas(ours, "default")[Q_NAME]  # our own bases: Kaiming-uniform bounds, as PEFT's
    assert 0.95 / 384 ** 0.5 < float(d0.A.abs().max()) <= 1 / 384 ** 0.5
    assert 0.95 / 16 ** 0.5 < float(d0.Bv.abs().max()) <= 1 / 16 ** 0.5
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, d in dt.deltas(ours, "default").items():
            layer = peft.base_model.model.get_submodule(name)
            d.A = layer.vera_A["default"][:, :384].clone()
            d.Bv = layer.vera_B["default"][:384].clone()
            for mine, theirs in ((d.d, layer.vera_lambda_d["default"]), (d.b, layer.vera_lambda_b["default"])):
                mine.copy_(torch.randn(mine.shape, generator=g))
                theirs.copy_(mine)
    torch.testing.assert_close(logits(ours, minilm_batch), logits(peft, minilm_batch), rtol=1e-4, atol=1e-5)
