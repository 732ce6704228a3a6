"""Orthogonal adaptation slots and frozen-basis methods (NoLA): seeds, export."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import logits, make_minilm, set_random_values

import deltatune as dt


Q_NAME = "bert.encoder.layer.0.attention.self.query"


def test_orthogonal_adaptation_slots_are_orthogonal_and_only_B_trains(minilm_dir, minilm_batch):
    model = make_minilm(minilm_dir)
    ref = logits(model, minilm_batch)
    for k in range(4):
        dt.attach(model, dt.OrthogonalAdaptation(r=8, slot=k, targets=["query", "value"]), name=f"s{k}",
                  activate=False)
    dt.set_active(model, "s0")
    torch.testing.assert_close(logits(model, minilm_batch), ref)  # B = 0 at init
    A = [dt.deltas(model, f"s{k}")[Q_NAME].A for k in range(4)]
    for i in range(4):
        torch.testing.assert_close(A[i] @ A[i].t(), torch.eye(8), rtol=0, atol=1e-6)
        for j in range(i + 1, 4):
            assert float((A[i] @ A[j].t()).abs().max()) < 1e-6
    # same seed and layer name give the same basis for everyone: a second model agrees
    other = dt.attach(make_minilm(minilm_dir), dt.OrthogonalAdaptation(r=8, slot=2, targets=["query"]))
    assert torch.equal(dt.deltas(other, "default")[Q_NAME].A, A[2])
    # only B is a parameter, and only B gets gradients
    d = dt.deltas(model, "s0")[Q_NAME]
    assert [n for n, _ in d.named_parameters()] == ["B"]
    assert dt.trainable_parameters(model)[0] == 12 * 384 * 8
    model.train()
    F.cross_entropy(model(**minilm_batch).logits, torch.tensor([0, 1, 0, 1, 1, 0])).backward()
    assert d.B.grad is not None and d.B.grad.abs().sum() > 0
    # random slots and the error when a layer has no room
    random_cols = []
    for _ in range(2):  # independent users: a fresh slot seed each, recorded in the config
        method = dt.OrthogonalAdaptation(r=8, slot="random", targets=["query"])
        user = dt.attach(make_minilm(minilm_dir), method)
        assert isinstance(method.slot_seed, int)
        random_cols.append(dt.deltas(user, "default")[Q_NAME].columns)
    assert all(len(set(c)) == 8 for c in random_cols) and random_cols[0] != random_cols[1]
    with pytest.raises(ValueError, match=r"query: slot 48 .*room for 48 slots"):
        dt.attach(make_minilm(minilm_dir), dt.OrthogonalAdaptation(r=8, slot=48, targets=["query"]))


def test_frozen_basis_checkpoints_store_seeds_and_export_exactly_to_peft(minilm_dir, minilm_batch, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    head = ["classifier"]
    for method, trained in [(dt.OrthogonalAdaptation(r=4, slot=3, alpha=8, modules_to_save=head), {"B"}),
                            (dt.VeRA(r=16, targets=["query", "value", "dense"], modules_to_save=head), {"d", "b"}),
                            (dt.NOLA(r=4, k_A=8, k_B=8, modules_to_save=head), {"alpha", "beta"})]:
        model = make_minilm(minilm_dir)
        dt.attach(model, method, name="x")
        set_random_values(model, "x", std=0.05)
        out = logits(model, minilm_batch)
        folder = tmp_path / method.name
        dt.save(model, folder)
        saved = load_file(str(next(folder.rglob("*.safetensors"))))
        assert {k.rsplit(".", 1)[-1] for k in saved if "classifier" not in k} == trained  # seeds, not matrices
        fresh = dt.load(make_minilm(minilm_dir), folder)
        torch.testing.assert_close(logits(fresh, minilm_batch), out)
        # export: the factors are materialized, so PEFT reproduces the outputs exactly
        dt.save(model, tmp_path / f"{method.name}-peft", format="peft")
        peft = PeftModel.from_pretrained(make_minilm(minilm_dir), str(tmp_path / f"{method.name}-peft"))
        torch.testing.assert_close(logits(peft, minilm_batch), out, rtol=1e-4, atol=1e-5)


def test_nola_combines_its_bases_with_the_trained_coefficients(minilm_dir):
    model = dt.attach(make_minilm(minilm_dir), dt.NOLA(r=4, k_A=6, k_B=5, alpha=8, targets=["query"]))
    d = dt.deltas(model, "default")[Q_NAME]
    assert dt.trainable_parameters(model)[0] == 6 * (6 + 5)
    with torch.no_grad():
        d.beta.copy_(torch.arange(5.0))
    B = sum(d.beta[j] * d.B_bases[j] for j in range(5))
    A = sum(d.alpha[i] * d.A_bases[i] for i in range(6))
    torch.testing.assert_close(d.dense(), 2.0 * B @ A)
    # the layers of one shape share one set of bases in memory
    d2 = dt.deltas(model, "default")["bert.encoder.layer.1.attention.self.query"]
    assert d2.A_bases.data_ptr() == d.A_bases.data_ptr() and not torch.equal(d2.alpha, d.alpha)


def test_a_random_slot_config_runs_no_collective_and_ranks_agree_at_attach(tmp_path, monkeypatch):
    """Making a config is local (it may happen on one rank, or before the process group exists); attaching, which
    every rank does, gives every rank rank 0's seed."""
    import torch.distributed as dist
    from torch import nn

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        calls = []
        real = dist.broadcast
        monkeypatch.setattr(dist, "broadcast", lambda t, src, *a, **k: (calls.append(src), real(t, src, *a, **k))[1])
        config = dt.OrthogonalAdaptation(r=2, slot="random", targets=["0"])
        assert calls == [] and isinstance(config.slot_seed, int)
        seed = config.slot_seed
        net = dt.attach(nn.Sequential(nn.Linear(8, 4)), config)
        assert calls == [0] and dt.model.method_of(net, "default").slot_seed == seed  # rank 0's (here: its own)
    finally:
        dist.destroy_process_group()
