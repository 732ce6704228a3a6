"""Merge-friendly adapters on real MiniLM weights: seeded frozen bases, Orthogonal Adaptation, VeRA, NOLA, OFT,
SORSA and the interference diagnostics (PEFT as the numerical reference for OFT and VeRA)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import logits, make_minilm, sst2_batches, train_loop

import deltatune as dt
from deltatune import bases
from deltatune.deltas.rotation import cayley, rotate, skew
from deltatune.interference import crosstalk

Q_NAME = "bert.encoder.layer.0.attention.self.query"
BASIS_SCRIPT = """
import hashlib, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from deltatune import bases
out = [bases.orthogonal_columns(0, "bert.encoder.layer.0.attention.self.query", 384, range(16)),
       bases.orthogonal_columns("public", "mlp", 1536, [3, 700, 1535]),
       bases.uniform(7, "vera/A/4", (4, 384), -1, 1)]
print(" ".join(hashlib.sha256(t.numpy().tobytes()).hexdigest() for t in out))
"""
# sha256 of the float32 bytes, recorded when the generator was written: a change here changes every saved adapter
GOLDEN = ["57589978606b445c9ffab27d311fd4f126631d02ae60f15e3c416b3dcb3790ee",
          "26a8d60b077383728c38464c3d618b15c0fe378caec45943c0f38e7e4a47df2c",
          "aae88749a1510cbd4893c9c461e2104b323bd46894dbb6bfa99f5002f40dc369"]


def _randomize(model, name, std=0.02, seed=0):
    """Give an adapter's trainable tensors random values (as if trained)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in dt.deltas(model, name).values():
            for p in d.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)


# -- frozen bases --------------------------------------------------------------------------------------------
def test_bases_are_identical_across_processes_and_thread_counts_and_match_the_recorded_bytes():
    runs = [subprocess.run([sys.executable, "-c", BASIS_SCRIPT, str(n)], capture_output=True, text=True, check=True)
            .stdout.split() for n in (1, 2)]
    assert runs[0] == runs[1] == GOLDEN
    here = hashlib.sha256(bases.orthogonal_columns(0, Q_NAME, 384, range(16)).numpy().tobytes())
    assert here.hexdigest() == GOLDEN[0]
    # columns do not depend on which others are asked for, and the cache hands out copies
    full = bases.orthogonal_columns(3, "k", 96, range(96))
    torch.testing.assert_close(bases.orthogonal_columns(3, "k", 96, [5, 17]), full[:, [5, 17]], rtol=0, atol=0)
    for cols in ([1, 2], [7]):  # a single column is already contiguous once transposed: still a copy
        bases.basis_slot(3, "k", 96, cols).zero_()
        assert bases.basis_slot(3, "k", 96, cols).abs().sum() > 0
    # and the whole basis is orthogonal
    torch.testing.assert_close(full.t() @ full, torch.eye(96), rtol=0, atol=1e-6)


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
        _randomize(model, "x", std=0.05)
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


# -- OFT -------------------------------------------------------------------------------------------------------
def test_oft_rotation_is_orthogonal_fused_gradients_match_autograd_and_merge_is_exact(minilm_dir, minilm_batch):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(12, 32 * 31 // 2, generator=g) * 0.1
    rows, cols = torch.triu_indices(32, 32, 1)
    Q = skew(q, rows, cols, 32)
    R = cayley(Q)
    eye = torch.eye(32).expand_as(R)
    torch.testing.assert_close(R.transpose(1, 2) @ R, eye, rtol=0, atol=1e-5)
    small = Q * 0.1  # spectral radius about 0.1: the series converges to the exact transform
    torch.testing.assert_close(cayley(small, "neumann", 12), cayley(small), rtol=0, atol=1e-5)

    model = make_minilm(minilm_dir)
    base = logits(model, minilm_batch)
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    dt.attach(model, dt.OFT(block_size=32, targets=["query", "value", "intermediate.dense"]))
    torch.testing.assert_close(logits(model, minilm_batch), base)  # R = I at init
    _randomize(model, "default", std=0.05)
    out = logits(model, minilm_batch)
    # fused node vs plain autograd for one layer: output, input and parameter gradients
    d = dt.deltas(model, "default")[Q_NAME]
    W, b = d.base_weight()
    x = torch.randn(40, 384, generator=g, requires_grad=True)
    fused_out = d.replace(x)
    gx, gq = torch.autograd.grad(fused_out.pow(2).sum(), (x, d.q))
    ref_out = F.linear(rotate(x, d.rotation()), W, b)
    rx, rq = torch.autograd.grad(ref_out.pow(2).sum(), (x, d.q))
    torch.testing.assert_close(fused_out, ref_out)
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gq, rq, rtol=1e-4, atol=1e-3)
    # merge is multiplicative and exact, unmerge restores the weights
    dt.merge(model)
    torch.testing.assert_close(logits(model, minilm_batch), out, rtol=1e-4, atol=1e-4)
    Wm = model.bert.get_submodule(Q_NAME.removeprefix("bert.")).weight
    R = d.rotation().detach()
    torch.testing.assert_close(Wm.detach(), rotate(W0[Q_NAME + ".weight"], R.transpose(1, 2)))  # W' = W R^T
    dt.unmerge(model)
    for n, p in dt.unload(model).named_parameters():
        torch.testing.assert_close(p, W0[n], rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["neumann", "exact"])
def test_oft_forward_equals_peft_oft_for_identical_parameters(minilm_dir, minilm_batch, variant):
    from peft import OFTConfig, get_peft_model

    cfg = OFTConfig(oft_block_size=32, r=0, target_modules=["query", "value", "dense"],
                    use_cayley_neumann=variant == "neumann", num_cayley_neumann_terms=5, init_weights=True)
    peft = get_peft_model(make_minilm(minilm_dir), cfg)
    ours = dt.attach(make_minilm(minilm_dir), dt.OFT(block_size=32, cayley=variant, terms=5,
                                                      targets=["query", "value", "dense"]))
    g = torch.Generator().manual_seed(2)
    sign = 1.0 if variant == "neumann" else -1.0  # PEFT's exact variant is (I - Q)(I + Q)^-1: ours with q -> -q
    with torch.no_grad():
        for name, d in dt.deltas(ours, "default").items():
            theirs = peft.base_model.model.get_submodule(name).oft_R["default"].weight
            d.q.copy_(torch.randn(d.q.shape, generator=g) * 0.02)
            theirs.copy_(sign * d.q)
    torch.testing.assert_close(logits(ours, minilm_batch), logits(peft, minilm_batch), rtol=1e-4, atol=1e-5)


def test_oft_radius_keeps_every_block_inside_its_ball(minilm_dir, sst2_rows):
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.OFT(block_size=32, radius=1e-2, targets=["query", "value"], modules_to_save=["classifier"]))
    train_loop(model, sst2_batches(minilm_dir, sst2_rows, n=2), steps=3, lr=0.1)
    rotations = [d for d in dt.deltas(model, "default").values() if isinstance(d, dt.RotationDelta)]
    assert len(rotations) == 12  # query and value in each of the 6 blocks: the checks below are not vacuous
    for d in rotations:
        limit = 1e-2 / d.blocks ** 0.5
        norms = d.skew().detach().flatten(1).norm(dim=1)
        assert float(norms.max()) <= limit * (1 + 1e-4)
        assert float(norms.min()) > 0.9 * limit  # lr 0.1 pushes every block to the boundary
        assert float(norms.max()) >= limit * (1 - 1e-4)  # the constraint bites: blocks were projected onto it
        R = cayley(d.skew().detach())
        assert float((R - torch.eye(R.shape[-1])).abs().max()) > 1e-4  # real rotations, not the identity


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


# -- interference ------------------------------------------------------------------------------------------------
def test_orthogonal_slots_interfere_far_less_than_plain_lora(minilm_dir, minilm_batch, tmp_path, capsys):
    from deltatune.cli import main

    targets = ["query", "value", "intermediate.dense"]
    oa = make_minilm(minilm_dir)
    lora = make_minilm(minilm_dir)
    for k, name in enumerate(["a", "b"]):
        dt.attach(oa, dt.OrthogonalAdaptation(r=8, slot=k, targets=targets), name=name, activate=False)
        dt.attach(lora, dt.LoRA(r=8, targets=targets), name=name, activate=False)
        _randomize(oa, name, std=0.05, seed=k)
        _randomize(lora, name, std=0.05, seed=k)
    ids = torch.randint(1000, 20000, (4, 24), generator=torch.Generator().manual_seed(0))
    rows = {m: dt.interference(model, ["a", "b"], inputs=[ids]) for m, model in (("oa", oa), ("lora", lora))}
    assert len(rows["oa"]) == 6 * len(targets)
    for r_oa, r_lora in zip(rows["oa"], rows["lora"]):
        assert r_oa["input_overlap"] < 1e-6 < 1e-3 < r_lora["input_overlap"]
        assert r_oa["crosstalk_ab"] > 0 and r_oa["crosstalk_ba"] > 0  # generic inputs: small, not zero
    assert dt.active_adapters(oa) == ["a"] and not oa.training  # the model is left as it was
    # on inputs that lie in a's input subspace, the orthogonal b adds exactly nothing; a LoRA b does not
    layer_oa = dt.deltas(oa, "a")[Q_NAME]
    x_in_a = torch.randn(64, 8) @ layer_oa.A
    ratio = lambda model: float(dt.deltas(model, "b")[Q_NAME](x_in_a).norm()  # noqa: E731
                                / dt.deltas(model, "a")[Q_NAME](x_in_a).norm())
    assert ratio(oa) < 1e-5 and ratio(lora) > 1e-2
    # measured cross-talk is a ratio of norms over the captured layer inputs
    talk = crosstalk(lora, ["a", "b"], {"a": [ids]})
    assert set(k[1:] for k in talk) == {("a", "b")}
    # the CLI compares saved adapters
    dt.save(oa, tmp_path / "oa", names=["a", "b"])
    assert main(["inspect", str(tmp_path / "oa" / "a"), "--interference", str(tmp_path / "oa" / "b"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed) == 3 * 6 and max(r["input_overlap"] for r in printed) < 1e-6


def test_weighted_merge_sums_adapters_with_lambda_and_unmerges_exactly(minilm_dir, minilm_batch):
    model = make_minilm(minilm_dir)
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    for k, name in enumerate(["a", "b"]):
        dt.attach(model, dt.OrthogonalAdaptation(r=8, slot=k, targets=["query", "value"]), name=name, activate=False)
        _randomize(model, name, std=0.05, seed=k)
    dt.attach(model, dt.OFT(block_size=32, targets=["key"]), name="rot", activate=False)
    _randomize(model, "rot", std=0.05, seed=3)
    dense = {n: {m: d.dense().detach() for m, d in dt.deltas(model, n).items()} for n in ("a", "b")}
    with pytest.raises(ValueError, match="2 merge weights for 3 adapters"):
        dt.merge(model, ["a", "b", "rot"], weights=[0.6, 0.6])
    dt.merge(model, ["a", "b", "rot"], weights={"a": 0.6, "b": 0.6, "rot": 0.5})
    q = model.bert.encoder.layer[0].attention.self
    torch.testing.assert_close(q.query.weight.detach(), W0[Q_NAME + ".weight"] + 0.6 * (dense["a"][Q_NAME]
                                                                                     + dense["b"][Q_NAME]))
    key = "bert.encoder.layer.0.attention.self.key"
    R_half = cayley(dt.deltas(model, "rot")[key].skew().detach() * 0.5)
    torch.testing.assert_close(q.key.weight.detach(), rotate(W0[key + ".weight"], R_half.transpose(1, 2)))
    with dt.disabled(model):  # takes the weighted merges out and puts them back with their weights
        pass
    torch.testing.assert_close(q.query.weight.detach(), W0[Q_NAME + ".weight"] + 0.6 * (dense["a"][Q_NAME]
                                                                                     + dense["b"][Q_NAME]))
    dt.unmerge(model)
    for n, p in dt.unload(model).named_parameters():
        torch.testing.assert_close(p, W0[n], rtol=0, atol=1e-6)


def test_rotation_and_additive_adapters_on_one_layer_merge_safely_and_unmerge_exactly(minilm_dir, minilm_batch):
    model = make_minilm(minilm_dir)
    base = logits(model, minilm_batch)
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    dt.attach(model, dt.LoRA(r=4, targets=["query", "value"]), name="l", activate=False)
    dt.attach(model, dt.OFT(block_size=32, targets=["query"]), name="o", activate=False)
    _randomize(model, "l", std=0.05, seed=1)
    _randomize(model, "o", std=0.05, seed=2)
    dt.set_active(model, ["l", "o"])
    live = logits(model, minilm_batch)  # W R^T + dW on the query layers
    with pytest.raises(ValueError, match="while 'o' is live"):
        dt.merge(model, ["l"])  # the rotation would act on the merged update too
    dt.merge(model, ["l", "o"])  # the rotation goes in first, whatever the order given
    torch.testing.assert_close(logits(model, minilm_batch), live, rtol=1e-4, atol=1e-4)
    with dt.disabled(model):
        torch.testing.assert_close(logits(model, minilm_batch), base, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(model, minilm_batch), live, rtol=1e-4, atol=1e-4)
    dt.unmerge(model, ["o"])  # not the last one merged: "l" comes out and goes back in around it
    dt.unmerge(model, ["l"])
    torch.testing.assert_close(logits(model, minilm_batch), live, rtol=1e-4, atol=1e-4)
    for n, p in dt.unload(model).named_parameters():
        torch.testing.assert_close(p, W0[n], rtol=0, atol=1e-6)


def test_oft_on_conv1d_follows_the_weight_through_dtype_casts():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)).eval()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        base = gpt(ids).logits
        dt.attach(gpt, dt.OFT(block_size=16, targets=["c_attn", "c_fc"]))
        assert torch.equal(gpt(ids).logits, base)
        _randomize(gpt, "default", std=0.05)
        out = gpt(ids).logits
        assert (out - base).abs().max() > 1e-3
        dt.merge(gpt)  # Conv1D stores W^T: the merge writes through the transposed view
        torch.testing.assert_close(gpt(ids).logits, out, rtol=1e-4, atol=1e-4)
        dt.unmerge(gpt)
        gpt.double()  # new parameter tensors: the rotation reads the layer's current weight, not a stale one
        torch.testing.assert_close(gpt(ids).logits.float(), out, rtol=1e-4, atol=1e-4)
