"""SORSA: exact at init, its orthogonality regularizer."""
from __future__ import annotations

import torch
from helpers import logits, make_minilm, sst2_batches

import deltatune as dt


# -- SORSA -----------------------------------------------------------------------------------------------------
def test_sorsa_is_exact_at_init_and_its_regularizer_matches_the_formula(minilm_dir, minilm_batch, sst2_rows,
                                                                        tmp_path):
    model = make_minilm(minilm_dir)
    base = logits(model, minilm_batch)
    dt.attach(model, dt.SORSA(r=8, gamma=0.1, targets=["query", "value"], modules_to_save=["classifier"]))
    torch.testing.assert_close(logits(model, minilm_batch), base, rtol=1e-4, atol=1e-4)
    ctrl = dt.model.registry(model).adapters["default"].controller
    deltas = [d for d in dt.deltas(model, "default").values() if isinstance(d, dt.GatedSVDDelta)]
    assert float(ctrl.regularizer()) < 1e-5  # singular vectors are orthonormal
    with torch.no_grad():
        for d in deltas:
            d.P.add_(torch.randn_like(d.P) * 0.05)
            d.Q.add_(torch.randn_like(d.Q) * 0.05)
    eye = torch.eye(8)
    terms = [torch.linalg.norm(d.Q @ d.Q.t() - eye) for d in deltas] + \
            [torch.linalg.norm(d.P.t() @ d.P - eye) for d in deltas]
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(ctrl.regularizer(), expected)
    # the gradient added before the step is (gamma / peak lr) dR/dM, on top of the task gradient
    auto = torch.autograd.grad(expected, [m for d in deltas for m in (d.P, d.Q)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(**sst2_batches(minilm_dir, sst2_rows, n=1)[0]).loss.backward()
    task = [m.grad.clone() for d in deltas for m in (d.P, d.Q)]
    dt.after_backward(model, opt)
    for t, a, m in zip(task, auto, [m for d in deltas for m in (d.P, d.Q)]):
        torch.testing.assert_close(m.grad, t + 0.1 / 0.5 * a, rtol=1e-4, atol=1e-6)
    # training pulls the factors back toward orthonormal (the regularizer's share of the step dominates here)
    before = float(ctrl.regularizer())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    for batch in sst2_batches(minilm_dir, sst2_rows, n=3):
        opt.zero_grad()
        model(**batch).loss.backward()
        dt.after_backward(model, opt)
        opt.step()
        dt.step(model, opt)
    model.eval()
    assert float(ctrl.regularizer()) < before
    # a checkpoint keeps the anchor frozen: training resumes on the same parameters and regularizer
    out = logits(model, minilm_batch)
    dt.save(model, tmp_path / "sorsa")
    fresh = dt.load(make_minilm(minilm_dir), tmp_path / "sorsa")
    torch.testing.assert_close(logits(fresh, minilm_batch), out)
    assert dt.trainable_parameters(fresh)[0] == dt.trainable_parameters(model)[0]
    fresh_ctrl = dt.model.registry(fresh).adapters["default"].controller
    torch.testing.assert_close(fresh_ctrl.regularizer(), ctrl.regularizer())
