"""AdaLoRA on real MiniLM weights: PEFT parity, masks, budget, resizing, checkpoints."""
from __future__ import annotations

import inspect
import json
import sys

import pytest
import torch
from helpers import logits, make_minilm, randomize, sst2_batches, train_loop
from torch import nn

import deltatune as dt
from deltatune.budget import cubic_budget, orthogonality, schedule


QV = ["query", "value"]


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
    # warm-up until the end: nothing masked before the last step, which fixes the final pattern
    assert _adalora_live_ranks(monkeypatch, lambda *a, **k: schedule.WARMUP) == [8] * 9 + [2]
    # "final" from the first step: the controller keeps the pattern as it is (a run resumed past T - t_final)
    assert _adalora_live_ranks(monkeypatch, lambda *a, **k: schedule.FINAL) == [8] * 10
    # the final pattern (b_T = 2 triplets, the others removed) is fixed at the last budgeting step: T - t_final = 8
    # by the real schedule, the last step when "budgeting" never ends
    _, sizes = _adalora_live_ranks(monkeypatch, spy, with_sizes=True)
    assert sizes[7] == 8 and sizes[8] == 2
    _, late = _adalora_live_ranks(monkeypatch, lambda *a, **k: schedule.BUDGETING, with_sizes=True)
    assert late[8] == 8 and late[9] == 2


def test_adalora_fixes_the_final_pattern_at_the_last_step_when_warm_up_lasts_until_then():
    """t_init = T - 1, t_final = 0 (a valid schedule): the last step is still warm-up, and it fixes the b_T triplets."""
    torch.manual_seed(0)
    net = dt.attach(nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)),
                    dt.AdaLoRA(init_r=4, target_r=1, targets=["0", "2"], t_init=5, t_final=0, delta_t=1))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(8, 16), torch.randn(8, 8)
    dt.begin(net, 6)
    for _ in range(6):
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
        dt.step(net, opt)
        opt.zero_grad()
    assert sum(d.lam.numel() for d in dt.deltas(net, "default").values()) == 2  # b_T = target_r x 2 matrices, cut
