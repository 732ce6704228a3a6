"""Adaptive rank budgets: the gated-SVD delta, the budget engine, AdaLoRA / IncreLoRA / SoRA controllers, their
checkpoints and PEFT interop, on real MiniLM weights and SST-2 sentences."""
from __future__ import annotations

import inspect
import json
import math
import sys

import pytest
import torch
from helpers import DATA, ROOT, logits, make_minilm, randomize, sst2_batches, train_loop
from torch import nn

import deltatune as dt
from deltatune.budget import schedule
from deltatune.budget import (
    Sensitivity,
    cubic_budget,
    keep_components_,
    masking_phase,
    orthogonality,
    orthogonality_grads,
    threshold_masks,
    triplet_scores,
)
from deltatune.methods.sora import soft_threshold_

QV = ["query", "value"]


def _random_gated(out_f: int, in_f: int, r: int, scale: float) -> dt.GatedSVDDelta:
    """A gated delta with every P, lam, Q entry drawn from N(0, 1) (seed first)."""
    d = dt.GatedSVDDelta(out_f, in_f, r, scale=scale)
    with torch.no_grad():
        for p in (d.P, d.lam, d.Q):
            p.normal_()
    return d


# -- the delta ------------------------------------------------------------------------------------------------
def test_gated_delta_forward_grads_and_merge_follow_the_formula():
    torch.manual_seed(0)
    d = _random_gated(12, 10, 5, 0.7)
    d.set_mask(torch.tensor([1.0, 0, 1, 1, 0]))
    W, b = torch.randn(12, 10), torch.randn(12)
    x = torch.randn(7, 10, requires_grad=True)
    out = d.fuse(x, W, b)  # the fused frozen-linear + delta kernel
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, d.P, d.lam, d.Q], g)
    P, lam, Q = (t.detach().clone().requires_grad_() for t in (d.P, d.lam, d.Q))
    x2 = x.detach().clone().requires_grad_()
    dense = 0.7 * P @ torch.diag(lam * d.mask) @ Q
    ref = x2 @ (W + dense).t() + b
    ref_grads = torch.autograd.grad(ref, [x2, P, lam, Q], g)
    torch.testing.assert_close(out, ref)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r)
    assert grads[2][1] == 0 and grads[2][0] != 0  # a masked gate gets no gradient
    torch.testing.assert_close(d.dense(), dense.detach())
    assert d.live().tolist() == [True, False, True, True, False]
    B, A, s = d.lowrank()  # export: gates folded into B, masked components dropped
    assert A.shape == (3, 10) and s == 0.7
    torch.testing.assert_close(s * B @ A, dense.detach())


def test_resize_keeps_outputs_gradients_and_optimizer_state():
    torch.manual_seed(0)
    d = _random_gated(6, 5, 4, 1.0)
    x = torch.randn(3, 5)
    opt = torch.optim.Adam(d.parameters(), lr=0.1)
    d(x).sum().backward()
    opt.step()
    with torch.no_grad():
        d.lam[2] = 0  # a pruned component
    before = d(x).detach()
    state_Q = opt.state[d.Q]["exp_avg"].clone()
    old_Q = d.Q
    ema = {d.Q: torch.arange(20.0).view(4, 5)}
    keep_components_(d, torch.tensor([0, 1, 3]), opt, [ema])
    assert d.r == 3 and d.Q is not old_Q
    torch.testing.assert_close(d(x), before)  # the dropped component had lam = 0
    assert any(q is d.Q for g in opt.param_groups for q in g["params"])
    assert not any(q is old_Q for g in opt.param_groups for q in g["params"])
    torch.testing.assert_close(opt.state[d.Q]["exp_avg"], state_Q[[0, 1, 3]])
    torch.testing.assert_close(ema[d.Q], torch.arange(20.0).view(4, 5)[[0, 1, 3]])
    assert d.Q.grad.shape == (3, 5)
    d(x).sum().backward()  # the optimizer keeps working on the new tensors
    q0 = d.Q.detach().clone()
    opt.step()
    assert not torch.equal(q0, d.Q)


def test_growing_pads_state_and_unresizable_state_is_refused():
    from deltatune.budget import grow_components_

    torch.manual_seed(0)
    d = _random_gated(6, 5, 2, 1.0)
    opt = torch.optim.AdamW(d.parameters(), lr=0.1)
    x = torch.randn(3, 5)
    d(x).sum().backward()
    opt.step()
    v = opt.state[d.Q]["exp_avg_sq"].clone()
    grow_components_(d, 3, opt)
    assert d.r == 5 and d.Q.grad.shape == (5, 5) and d.Q.grad[2:].abs().sum() == 0
    assert torch.equal(opt.state[d.Q]["exp_avg_sq"][:2], v)
    torch.testing.assert_close(opt.state[d.Q]["exp_avg_sq"][2:], torch.full((3, 5), float(v.mean())))
    assert opt.state[d.Q]["exp_avg"][2:].abs().sum() == 0
    d(x).sum().backward()
    opt.step()  # trains old and new entries alike

    factored = torch.optim.Adafactor(d.parameters(), lr=0.01)  # row/column second moments: cannot be sliced
    d(x).sum().backward()
    factored.step()
    P = d.P
    with pytest.raises(ValueError, match="factored or blockwise"):
        keep_components_(d, torch.tensor([0, 1]), factored)
    assert d.P is P and d.r == 5  # refused before anything changed


def test_mask_survives_load_state_dict():
    d = dt.GatedSVDDelta(4, 3, 2, scale=1.0)
    with torch.no_grad():
        d.P.fill_(1.0), d.Q.fill_(1.0), d.lam.fill_(1.0)
    state = {k: v.clone() for k, v in d.state_dict().items()}
    state["mask"] = torch.tensor([1.0, 0.0])
    d.load_state_dict(state)
    assert d.live().tolist() == [True, False]
    torch.testing.assert_close(d.dense(), torch.ones(4, 3))  # one live component of P Q


# -- the engine -------------------------------------------------------------------------------------------------
def test_cubic_schedule_values():
    # b_init 24, b_T 8, t_init 10, t_final 20, T 110: the cubic runs over steps 10..90
    args = dict(b_init=24, b_target=8, t_init=10, t_final=20, total=110)
    assert cubic_budget(0, **args) == 24 and cubic_budget(10, **args) == 24
    assert cubic_budget(30, **args) == int(8 + 16 * (1 - 20 / 80) ** 3) == 14
    assert cubic_budget(50, **args) == int(8 + 16 * 0.5 ** 3) == 10
    assert cubic_budget(90, **args) == 8 and cubic_budget(91, **args) == 8 and cubic_budget(109, **args) == 8
    budgets = [cubic_budget(t, **args) for t in range(110)]
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))  # never grows
    assert [masking_phase(t, 10, 20, 110) for t in (10, 11, 90, 91)] == ["warmup", "budgeting", "budgeting", "final"]


def test_threshold_allocation_is_global_and_exact():
    scores = [torch.tensor([0.9, 0.1, 0.5]), torch.tensor([0.3, 0.8]), torch.tensor([0.05])]
    keep = threshold_masks(scores, 3)
    assert [k.tolist() for k in keep] == [[True, False, True], [False, True], [False]]
    assert sum(int(k.sum()) for k in threshold_masks(scores, 0)) == 0
    assert all(bool(k.all()) for k in threshold_masks(scores, 6))


def test_sensitivity_ema_and_triplet_scores_follow_the_definition():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    s = Sensitivity(beta1=0.5, beta2=0.5)
    ibar = ubar = torch.zeros(2)
    for g in (torch.tensor([3.0, 1.0]), torch.tensor([-1.0, 2.0])):
        w.grad = g
        s.update([w])
        i = (w.detach() * g).abs()
        ibar = 0.5 * ibar + 0.5 * i
        ubar = 0.5 * ubar + 0.5 * (i - ibar).abs()
    torch.testing.assert_close(s.score(w), ibar * ubar)
    sP, sl, sQ = torch.ones(4, 2), torch.tensor([1.0, 2.0]), torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    torch.testing.assert_close(triplet_scores(sP, sl, sQ), torch.tensor([1 + 2 + 1.0, 2 + 0 + 1.0]))


def test_orthogonality_gradients_equal_autograd():
    torch.manual_seed(0)
    Ps = [torch.randn(8, 3, requires_grad=True), torch.randn(5, 2, requires_grad=True)]
    Qs = [torch.randn(3, 6, requires_grad=True), torch.randn(2, 4, requires_grad=True)]
    R = orthogonality(Ps, Qs)
    ref = torch.autograd.grad(R, Ps + Qs)
    gP, gQ = orthogonality_grads(Ps, Qs)
    for a, b in zip(gP + gQ, ref):
        torch.testing.assert_close(a, b)


# -- AdaLoRA on MiniLM -------------------------------------------------------------------------------------------
def test_adalora_forward_equals_peft(minilm_dir, minilm_batch):
    from peft import AdaLoraConfig, get_peft_model

    ours = make_minilm(minilm_dir)
    dt.attach(ours, dt.AdaLoRA(init_r=6, target_r=3, alpha=8, targets=QV, total_step=10))
    randomize(ours, "default", std=0.1)
    ref = get_peft_model(make_minilm(minilm_dir), AdaLoraConfig(init_r=6, target_r=3, lora_alpha=8,
                                                                  target_modules=QV, total_step=10)).eval()
    with torch.no_grad():
        for mod, d in dt.deltas(ours, "default").items():
            m = ref.base_model.model.get_submodule(mod)
            m.lora_A["default"].copy_(d.Q)
            m.lora_E["default"].copy_(d.lam[:, None])
            m.lora_B["default"].copy_(d.P)
    torch.testing.assert_close(logits(ours, minilm_batch), logits(ref, minilm_batch), atol=1e-5, rtol=1e-4)
    assert dt.deltas(ours, "default")["bert.encoder.layer.0.attention.self.query"].scale == 8 / 6  # alpha / init_r


def test_adalora_masks_match_peft_step_by_step(minilm_dir, sst2_rows):
    """Same parameters, data and optimizer: after every step our live triplets are PEFT's (importance, schedule,
    threshold, final pattern and the orthogonal regularizer all agree)."""
    from peft import AdaLoraConfig, get_peft_model

    cfg = dict(t_init=2, t_final=3, delta_t=2, total_step=12)
    ours = make_minilm(minilm_dir)
    dt.attach(ours, dt.AdaLoRA(init_r=4, target_r=2, alpha=8, targets=QV, shrink="never",
                               modules_to_save=["classifier"], **cfg))
    # task_type matters: without it PeftModel.forward bypasses AdaLoraModel.forward and drops the regularizer
    ref = get_peft_model(make_minilm(minilm_dir), AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=8, target_modules=QV, lora_dropout=0.0, total_step=12, tinit=2, tfinal=3,
        deltaT=2, task_type="SEQ_CLS"))
    pairs = []
    with torch.no_grad():
        for mod, d in dt.deltas(ours, "default").items():
            if isinstance(d, dt.GatedSVDDelta):
                m = ref.base_model.model.get_submodule(mod)
                d.Q.copy_(m.lora_A["default"]), d.lam.copy_(m.lora_E["default"][:, 0]), d.P.copy_(m.lora_B["default"])
                pairs.append((d, m.lora_E["default"]))
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=5e-3) for m in (ours, ref)]
    ours.eval(), ref.eval()  # no dropout: both see identical activations (gradients still flow)
    masked_steps = 0
    for t, batch in enumerate(sst2_batches(minilm_dir, sst2_rows, n=12)):
        for model, opt in zip((ours, ref), opts):
            model(**batch).loss.backward()
            opt.step()
        dt.step(ours, opts[0])
        ref.base_model.update_and_allocate(t)
        for opt in opts:
            opt.zero_grad()
        live_ours = [d.live() for d, _ in pairs]
        live_ref = [E[:, 0] != 0 for _, E in pairs]
        assert [x.tolist() for x in live_ours] == [x.tolist() for x in live_ref], f"step {t}"
        masked_steps += sum(int((~x).sum()) for x in live_ref) > 0
    assert masked_steps >= 5 and sum(int(x.sum()) for x in live_ours) == 2 * 12


def test_adalora_live_components_follow_the_budget(minilm_dir, sst2_rows):
    model = make_minilm(minilm_dir)
    m = dt.AdaLoRA(init_r=4, target_r=2, targets=QV, t_init=2, t_final=3, delta_t=2, total_step=14)
    dt.attach(model, m, name="ada")
    ctrl = dt.model.registry(model).adapters["ada"].controller
    seen = []

    def check(t):
        live = ctrl.live_rank()
        if t == ctrl.final_step():
            assert live == 2 * 12 and all(d.r <= 4 for d in ctrl.deltas.values())
        elif 2 < t < 11 and t % 2 == 0:  # a masking event
            assert live == cubic_budget(t, 48, 24, 2, 3, 14), t
            seen.append(live)
        assert dt.controller_metrics(model)["rank"] == live

    train_loop(model, sst2_batches(minilm_dir, sst2_rows), 14, after=check)
    assert len(seen) == 4 and seen == sorted(seen, reverse=True) and seen[0] < 48
    ranks = [d.r for d in dt.deltas(model, "ada").values()]
    assert sum(ranks) == 24 and len(set(ranks)) > 1  # physically shrunk, unevenly
    with pytest.raises(ValueError, match="total_step=14"):
        dt.step(model)  # step 15 of a 14-step schedule


def test_shrinking_changes_no_output(minilm_dir, sst2_rows, minilm_batch):
    """The same run with shrink='final' (components removed) and shrink='never' (masked) gives the same model."""
    batches = sst2_batches(minilm_dir, sst2_rows)
    models = {}
    for shrink in ("final", "never"):
        model = make_minilm(minilm_dir)
        torch.manual_seed(0)
        dt.attach(model, dt.AdaLoRA(init_r=4, target_r=2, targets=QV, t_init=1, t_final=3, total_step=8,
                                    orth_reg_weight=0.0, shrink=shrink))
        train_loop(model, batches, 8)
        models[shrink] = model
    shrunk, masked = (dt.deltas(models[k], "default") for k in ("final", "never"))
    assert sum(d.r for d in shrunk.values()) == 24 and sum(d.r for d in masked.values()) == 48
    assert [d.r for d in shrunk.values()] == [int(d.mask.sum()) for d in masked.values()]
    torch.testing.assert_close(logits(models["final"], minilm_batch), logits(models["never"], minilm_batch),
                               atol=1e-5, rtol=1e-4)


def test_regularizer_applies_to_a_model_returning_a_plain_tensor():
    """The orthogonal regularizer enters the gradients during backward, once per optimizer step, whatever the
    model returns (PEFT adds it only to ``outputs.loss``)."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(10, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))  # a raw tensor

    grads = {}
    x = torch.randn(8, 10)
    for gamma in (0.0, 0.3):
        torch.manual_seed(1)
        net = Net()
        dt.attach(net, dt.AdaLoRA(init_r=3, target_r=2, targets=["a", "b"], total_step=5, orth_reg_weight=gamma))
        randomize(net, "default", std=0.3)
        for _ in range(2):  # two accumulated micro-batches: the term is added once
            net(x).pow(2).mean().backward()
        ds = dt.deltas(net, "default")
        grads[gamma] = {k: (d.P.grad.clone(), d.Q.grad.clone()) for k, d in ds.items()}
    P = [d.P.detach().clone().requires_grad_() for d in ds.values()]
    Q = [d.Q.detach().clone().requires_grad_() for d in ds.values()]
    reg = torch.autograd.grad(0.3 * orthogonality(P, Q), P + Q)
    for i, k in enumerate(ds):
        torch.testing.assert_close(grads[0.3][k][0] - grads[0.0][k][0], reg[i])
        torch.testing.assert_close(grads[0.3][k][1] - grads[0.0][k][1], reg[len(P) + i])


def test_misuse_gives_clear_errors(minilm_dir, sst2_rows):
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.AdaLoRA(init_r=4, target_r=2, targets=QV))
    batch = sst2_batches(minilm_dir, sst2_rows, n=1)[0]
    model(**batch).loss.backward()
    with pytest.raises(ValueError, match="total_step"):
        dt.step(model)  # no total_step and no dt.begin
    dt.begin(model, total_steps=3)
    for p in model.parameters():
        p.grad = None
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        dt.step(model)
    with pytest.raises(ValueError, match="target_r"):
        dt.attach(model, dt.AdaLoRA(init_r=2, target_r=4), name="bad")
    with pytest.raises(ValueError, match="total_step=3"):
        dt.begin(make_adalora_with_total(minilm_dir, 3), total_steps=5)
    with pytest.warns(UserWarning, match="will not finish"):
        dt.begin(make_adalora_with_total(minilm_dir, 9), total_steps=5)


def test_resizing_needs_the_optimizer_and_resuming_keeps_the_pattern():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    dt.attach(net, dt.AdaLoRA(init_r=4, target_r=2, targets=["0", "2"], t_init=1, t_final=2, total_step=6))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    for t in range(5):
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
        if t < 4:
            dt.step(net, opt)
        else:  # step 4 = T - t_final fixes the pattern and removes triplets: without the optimizer, refuse
            with pytest.raises(ValueError, match="pass the optimizer"):
                dt.step(net)
            assert [d.r for d in dt.deltas(net, "default").values()] == [4, 4]
            dt.step(net, opt)
        opt.zero_grad()
    ranks = [d.r for d in dt.deltas(net, "default").values()]
    assert sum(ranks) == 4
    dt.begin(net, total_steps=6, step=5)  # a resumed run after the final step: the pattern stays
    ((net(x) - y) ** 2).mean().backward()
    opt.step()
    assert not dt.step(net, opt)
    assert [d.r for d in dt.deltas(net, "default").values()] == ranks
    assert dt.controller_metrics(net)["rank"] == 4


def make_adalora_with_total(minilm_dir, total):
    model = make_minilm(minilm_dir)
    return dt.attach(model, dt.AdaLoRA(init_r=4, target_r=2, targets=QV, total_step=total))


def test_unequal_ranks_round_trip_and_export_to_peft(minilm_dir, sst2_rows, minilm_batch, tmp_path):
    from peft import PeftModel

    model = make_minilm(minilm_dir)
    dt.attach(model, dt.AdaLoRA(init_r=4, target_r=2, targets=QV, t_init=1, t_final=2, total_step=6,
                                modules_to_save=["classifier"]), name="ada")
    train_loop(model, sst2_batches(minilm_dir, sst2_rows), 6)
    want = logits(model, minilm_batch)
    ranks = {k: d.r for k, d in dt.deltas(model, "ada").items() if isinstance(d, dt.GatedSVDDelta)}
    assert len(set(ranks.values())) > 1
    dt.save(model, tmp_path / "ada")
    spec = json.loads((tmp_path / "ada" / "adapter_config.json").read_text())
    assert {k: v["r"] for k, v in spec["modules"].items() if "r" in v} == ranks

    fresh = make_minilm(minilm_dir)
    dt.load(fresh, tmp_path / "ada")
    assert {k: d.r for k, d in dt.deltas(fresh, "ada").items() if isinstance(d, dt.GatedSVDDelta)} == ranks
    torch.testing.assert_close(logits(fresh, minilm_batch), want)
    dt.merge(fresh)
    torch.testing.assert_close(logits(fresh, minilm_batch), want, atol=1e-5, rtol=1e-4)

    # export to PEFT LoRA: exact, loads in PEFT with per-module ranks
    from deltatune.cli import main
    assert main(["export", str(tmp_path / "ada"), "--to", "peft", str(tmp_path / "peft")]) == 0
    peft_model = PeftModel.from_pretrained(make_minilm(minilm_dir), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(peft_model, minilm_batch), want, atol=1e-5, rtol=1e-4)

    # the rank heatmap
    assert main(["inspect", str(tmp_path / "ada"), "--plot", str(tmp_path / "ranks.png")]) == 0
    assert (tmp_path / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_import_peft_adalora_checkpoint(minilm_dir, sst2_rows, minilm_batch, tmp_path):
    """A PEFT AdaLoRA run (pruned, saved with its rank pattern) loads into deltatune with the same outputs."""
    from peft import AdaLoraConfig, PeftModel, get_peft_model

    peft_model = get_peft_model(make_minilm(minilm_dir), AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=8, target_modules=QV, total_step=6, tinit=1, tfinal=2, deltaT=1))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-3)
    peft_model.train()
    for t, batch in enumerate(sst2_batches(minilm_dir, sst2_rows, n=6)):
        peft_model(**batch).loss.backward()
        opt.step()
        peft_model.base_model.update_and_allocate(t)
        opt.zero_grad()
    peft_model.save_pretrained(tmp_path / "peft_ada")
    ref = PeftModel.from_pretrained(make_minilm(minilm_dir), tmp_path / "peft_ada").eval()
    want = logits(ref, minilm_batch)

    ours = make_minilm(minilm_dir)
    dt.load(ours, tmp_path / "peft_ada")
    ranks = [d.r for d in dt.deltas(ours, "default").values()]
    assert sum(ranks) < 4 * 12 and len(set(ranks)) > 1  # the pruned pattern came along
    torch.testing.assert_close(logits(ours, minilm_batch), want, atol=1e-5, rtol=1e-4)
    assert dt.model.method_of(ours, "default").init_r == 4


# -- IncreLoRA and SoRA --------------------------------------------------------------------------------------------
def _adalora_live_ranks(monkeypatch, phase=None, T=10, with_sizes=False):
    """Live ranks after each of ``T`` steps of AdaLoRA (t_init=5, t_final=2, masking every step) on a small MLP;
    with ``phase``, ``deltatune.budget.schedule.masking_phase`` is replaced by it wherever deltatune holds it."""
    real = schedule.masking_phase
    if phase is not None:
        holders = [m for name, m in sorted(sys.modules.items())
                   if name.startswith("deltatune") and getattr(m, "masking_phase", None) is real]
        for m in holders:
            monkeypatch.setattr(m, "masking_phase", phase)
    torch.manual_seed(0)
    net = dt.attach(nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)),
                    dt.AdaLoRA(init_r=4, target_r=1, targets=["0", "2"], t_init=5, t_final=2, delta_t=1))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(8, 16), torch.randn(8, 8)
    dt.begin(net, T)
    live, sizes = [], []
    for _ in range(T):
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
        dt.step(net, opt)
        opt.zero_grad()
        live.append(sum(int((d.lam.detach() != 0).sum()) for d in dt.deltas(net, "default").values()))
        sizes.append(sum(d.lam.numel() for d in dt.deltas(net, "default").values()))
    return (live, sizes) if with_sizes else live


def test_adalora_masking_follows_masking_phase(monkeypatch):
    """The controller asks ``budget.schedule.masking_phase`` which phase a step is in, and acts on the answer."""
    real = schedule.masking_phase
    assert _adalora_live_ranks(monkeypatch)[:6] == [8] * 6  # warm-up: t <= t_init masks nothing
    calls = []

    def spy(*args, **kwargs):
        calls.append(inspect.signature(real).bind(*args, **kwargs).arguments)
        return real(*args, **kwargs)

    normal = _adalora_live_ranks(monkeypatch, spy)
    assert min(normal) < 8  # the schedule masks (and the spy changed nothing)
    assert {c["t"] for c in calls} >= set(range(8)) and {(c["t_init"], c["t_final"], c["total"]) for c in calls} \
        == {(5, 2, 10)}  # consulted at every step before the final pattern, with the method's schedule
    assert _adalora_live_ranks(monkeypatch, lambda *a, **k: schedule.WARMUP) == [8] * 10  # never masks
    # "final" from the first step: the controller keeps the pattern as it is (a run resumed past T - t_final)
    assert _adalora_live_ranks(monkeypatch, lambda *a, **k: schedule.FINAL) == [8] * 10
    # the final pattern (b_T = 2 triplets, the others removed) is fixed at the last budgeting step: T - t_final = 8
    # by the real schedule, the last step when "budgeting" never ends
    _, sizes = _adalora_live_ranks(monkeypatch, spy, with_sizes=True)
    assert sizes[7] == 8 and sizes[8] == 2
    _, late = _adalora_live_ranks(monkeypatch, lambda *a, **k: schedule.BUDGETING, with_sizes=True)
    assert late[8] == 8 and late[9] == 2


def test_increlora_grows_to_the_budget_and_trains_new_components(minilm_dir, sst2_rows):
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.IncreLoRA(init_r=1, target_r=2, targets=QV, top_h=4, incre_interval=2, alpha=4))
    dt.begin(model, total_steps=16)
    history = []
    opt = train_loop(model, sst2_batches(minilm_dir, sst2_rows), 16,
                after=lambda t: history.append(dt.controller_metrics(model)["rank"]))
    ds = dt.deltas(model, "default")
    assert history[0] == 12 and history[-1] == 24 and history == sorted(history)
    assert history[4] == 12 + 4 + 4  # steps 2 and 4 grew 4 modules by one component each
    grown = [d for d in ds.values() if d.r > 1]
    assert {d.scale for d in grown} == {4 / d.r for d in grown}  # alpha / current rank
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in params for d in ds.values() for p in (d.P, d.lam, d.Q))  # new tensors are optimized
    assert all(bool((d.lam != 0).all()) for d in ds.values())  # every component, old and new, trained


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


def test_trainer_drives_adalora_and_logs_the_budget(minilm_dir, sst2_rows, tmp_path):
    from transformers import AutoTokenizer

    from deltatune.train import TrainArgs, encode_classification, train

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    rows = [{"sentence": t, "label": y} for t, y in sst2_rows[:64]]
    examples, _ = encode_classification(rows, tok, "sentence", "label", max_length=48)
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.AdaLoRA(init_r=4, target_r=2, targets=QV, t_init=2, t_final=2,
                                modules_to_save=["classifier"]))  # no total_step: the trainer provides it
    result = train(model, examples, TrainArgs(lr=5e-3, batch_size=8, max_steps=8, progress=False),
                   output_dir=tmp_path)
    logged = [r for r in result["history"] if "loss" in r]
    assert [r["budget"] for r in logged][:3] == [48, 48, 48] and logged[-1]["budget"] == 24
    assert logged[-1]["rank"] == 24 and min(r["rank"] for r in logged) == 24
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sum(v["r"] for v in saved["modules"].values() if "r" in v) == 24
    assert math.isfinite(result["train_loss"])


def test_hf_trainer_callback_drives_adalora(minilm_dir, sst2_rows, tmp_path):
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from deltatune.train import Collator, DeltatuneCallback, encode_classification

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    rows = [{"sentence": t, "label": y} for t, y in sst2_rows[:48]]
    examples, _ = encode_classification(rows, tok, "sentence", "label", max_length=48)
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.AdaLoRA(init_r=4, target_r=2, targets=QV, t_init=1, t_final=2))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8,
                             learning_rate=5e-3, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=examples, data_collator=Collator(tok.pad_token_id),
            callbacks=[DeltatuneCallback()]).train()
    assert sum(d.r for d in dt.deltas(model, "default").values()) == 24


def test_adalora_example_config_runs_from_the_cli(tmp_path):
    import yaml

    from deltatune.cli import main

    config = yaml.safe_load((ROOT / "examples" / "sst2_adalora.yaml").read_text())
    sst2 = DATA / "glue" / "SST-2"
    config["data"].update(train=str(sst2 / "train.tsv"), eval=str(sst2 / "dev.tsv"), max_train_rows=96,
                          max_eval_rows=32)
    config["method"].update(t_init=1, t_final=2, delta_t=1)
    config["train"].update(batch_size=16, max_steps=6, eval_every=None, progress=False)
    config["output_dir"] = str(tmp_path / "out")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    ranks = {m: v["r"] for m, v in saved["modules"].items() if v["structure"] == "gated_svd"}
    assert len(ranks) == 37 and sum(ranks.values()) == 8 * 37  # every `dense` matches, the pooler's too
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rank"] for r in logged if "rank" in r][-1] == 8 * 37
    assert main(["inspect", str(tmp_path / "out" / "adapter"), "--plot", str(tmp_path / "ranks.png")]) == 0
    assert (tmp_path / "ranks.png").stat().st_size > 1000
