"""SoRA: soft-thresholded gates, zero gates dropped at the end."""
from __future__ import annotations

import pytest
import torch
from helpers import logits, make_minilm, sst2_batches, train_loop

import deltatune as dt
from deltatune.methods.sora import soft_threshold_


QV = ["query", "value"]


def test_sora_soft_threshold_and_zero_gates_dropped_at_the_end(minilm_dir, sst2_rows, minilm_batch):
    g = torch.tensor([0.5, -0.05, 0.02, -0.7])
    assert soft_threshold_(g, 0.1).tolist() == pytest.approx([0.4, 0.0, 0.0, -0.6])
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.SoRA(r=4, targets=QV, threshold=0.15))
    dt.begin(model, total_steps=8)
    batches = sst2_batches(minilm_dir, sst2_rows)
    opt = train_loop(model, batches, 6, lr=1e-3)
    ds = dt.deltas(model, "default")
    zeros = sum(int((d.lam == 0).sum()) for d in ds.values())
    assert 0 < zeros < 4 * 12  # the proximal step zeroed some gates, not all
    ctrl = dt.model.registry(model).adapters["default"].controller
    before = logits(model, minilm_batch)
    assert ctrl.drop_zero_gates(opt)
    assert sum(d.r for d in ds.values()) == 4 * 12 - zeros
    torch.testing.assert_close(logits(model, minilm_batch), before)  # zero gates contributed nothing
    train_loop(model, batches, 2, lr=1e-3, opt=opt)  # steps 7 and 8: the last one drops zero gates by itself
    assert all(bool((d.lam != 0).all()) for d in ds.values())
    assert dt.controller_metrics(model)["rank"] == sum(d.r for d in ds.values())
