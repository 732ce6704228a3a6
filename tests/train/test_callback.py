"""The HF Trainer callback drives deltatune controllers."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from helpers import make_minilm, minilm

import deltatune as dt
from deltatune.train import Collator


QV = ["query", "value"]


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


@dataclass
class CountingLoRA(dt.LoRA):
    """LoRA whose controller records every call (to check that HF's Trainer drives controllers)."""

    name = "counting_lora"

    def controller(self, deltas, model):
        return Counter(model)


class Counter(dt.Controller):
    calls: list = []

    def __init__(self, model):
        self.model = model

    def after_backward(self, info):
        assert all(p.grad is not None for p in self.model.parameters() if p.requires_grad)
        Counter.calls.append(("after_backward", info.step))

    def after_step(self, info):
        assert info.optimizer is not None
        Counter.calls.append(("step", info.step))


def test_hf_trainer_callback_drives_controllers(minilm_dir, sst2, tmp_path):
    from transformers import Trainer, TrainingArguments

    from deltatune.train import DeltatuneCallback

    model = minilm(minilm_dir)
    dt.attach(model, CountingLoRA(r=4, modules_to_save=["classifier"]))
    b0 = {k: d.B.detach().clone() for k, d in dt.deltas(model, "default").items() if hasattr(d, "B")}
    Counter.calls.clear()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=1e-3, report_to="none",
                             save_strategy="no", use_cpu=True, disable_tqdm=True, logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=sst2[0][:32], data_collator=Collator(),
            callbacks=[DeltatuneCallback()]).train()
    assert Counter.calls == [(hook, s) for s in range(3) for hook in ("after_backward", "step")]
    assert all(not torch.equal(d.B, b0[k]) for k, d in dt.deltas(model, "default").items() if k in b0)
