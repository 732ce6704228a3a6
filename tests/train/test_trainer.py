"""deltatune.train trainer: loss, gradient accumulation, schedules, controllers."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import make_minilm, minilm

import deltatune as dt
from deltatune.train import Collator, TrainArgs, eval_loader, evaluate, lr_factor, train


def test_lr_schedule():
    assert [lr_factor(s, 10, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 10, 4) == 1.0 and lr_factor(9, 10, 4) == pytest.approx(1 / 6)
    assert lr_factor(7, 10, 4, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(9, 10, 0, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown training argument.*allowed"):
        TrainArgs.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="schedule"):
        TrainArgs.from_dict({"schedule": "step"})


# -- trainer ------------------------------------------------------------------------------------------------------
def test_trainer_lowers_loss_and_changes_only_the_adapter(minilm_dir, sst2, tmp_path):
    train_ex, dev_ex = sst2
    model = minilm(minilm_dir)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    dt.attach(model, dt.LoRA(r=8, alpha=16, modules_to_save=["classifier"]), name="sst2")
    init = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    train_set = eval_loader(train_ex, 50, Collator())
    before = evaluate(model, train_set, "classification")

    args = TrainArgs(lr=3e-3, batch_size=8, max_steps=20, eval_every=10, warmup_steps=2, progress=False)
    result = train(model, train_ex, args, eval_data=dev_ex, output_dir=tmp_path)
    after = evaluate(model, train_set, "classification")
    assert after["eval_loss"] < before["eval_loss"] - 0.03, (before, after)

    for name, p in model.named_parameters():
        if p.requires_grad:  # every adapter and head tensor moved
            assert ".deltas.sst2." in name and not torch.equal(p, init[name]), name
        else:  # the base weights are bit-identical
            assert torch.equal(p, base[name.replace(".base.", ".")]), name
    assert set(init) == {n for n, p in model.named_parameters() if p.requires_grad}

    lines = [json.loads(line) for line in Path(result["metrics_path"]).read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    assert all({"lr", "time", "epoch"} <= set(r) for r in steps) and steps[0]["lr"] == pytest.approx(1.5e-3)
    assert [r["step"] for r in lines if "eval_accuracy" in r] == [10, 20]
    assert result["eval"] == {k: v for k, v in lines[-1].items() if k.startswith("eval_")}
    assert Path(result["plot_path"]).read_bytes()[:4] == b"\x89PNG"

    fresh = dt.load(minilm(minilm_dir, seed=1), result["adapter_path"])  # a differently initialized head
    assert evaluate(fresh, eval_loader(dev_ex, 64, Collator()), "classification") == pytest.approx(result["eval"])


def test_gradient_accumulation_equals_a_larger_batch(minilm_dir, sst2):
    data = sst2[0][:48]
    trained = []
    for batch_size, accum in ((4, 2), (8, 1)):
        model = minilm(minilm_dir, dropout=0.0)
        dt.attach(model, dt.LoRA(r=4, alpha=8, modules_to_save=["classifier"]))
        args = TrainArgs(lr=1e-3, batch_size=batch_size, grad_accum=accum, max_steps=3, shuffle=False,
                         progress=False)
        result = train(model, data, args)
        trained.append(({k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}, result))
    (a, ra), (b, rb) = trained
    assert a.keys() == b.keys()
    for k in a:  # Adam divides by sqrt(v): entries whose gradient is near zero amplify summation-order rounding
        # (1.3e-5 seen on one CPU after 3 steps); a tenth of one lr-sized step is still far below a wrong batch
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4, msg=k)
    assert [r["loss"] for r in ra["history"]] == pytest.approx([r["loss"] for r in rb["history"]], rel=1e-5)


QV = ["query", "value"]


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
