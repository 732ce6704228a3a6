"""Gradient checkpointing (reentrant and not) with every structure and with the controllers that read gradients
(AdaLoRA / IncreLoRA sensitivities, SoRA's proximal step, SpIEL's gradient accumulation, SORSA's regularizer):
a few training steps give the same adapter as without checkpointing."""
from __future__ import annotations

import pytest
import torch
from helpers import make_minilm

import deltatune as dt

T = ["query", "value"]
METHODS = {
    "lora": lambda: dt.LoRA(r=4, targets=T),
    "adalora": lambda: dt.AdaLoRA(init_r=6, target_r=3, t_init=1, t_final=1, delta_t=1, total_step=4, targets=T),
    "increlora": lambda: dt.IncreLoRA(init_r=2, target_r=4, init_warmup=1, incre_interval=1, total_step=4,
                                      targets=T),
    "sora": lambda: dt.SoRA(r=4, targets=T),
    "spiel": lambda: dt.SpIEL(density=0.005, reselection_steps=2, accumulation_steps=1, targets=T),
    "sorsa": lambda: dt.SORSA(r=4, gamma=0.1, targets=T),
    "s2ft": lambda: dt.S2FT(v_ratio=0.1, o_ratio=0.1, d_ratio=0.02),
    "oft": lambda: dt.OFT(block_size=32, targets=T),
    "vera": lambda: dt.VeRA(r=16, targets=T),
    "orthogonal": lambda: dt.OrthogonalAdaptation(r=4, targets=T),
}


def train(minilm_dir, batch, method, checkpointing: str | None, steps=4):
    model = make_minilm(minilm_dir)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    dt.attach(model, method(), name="a")
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    start = {k: v.detach().clone() for k, v in model.state_dict().items() if ".deltas." in k}
    dt.begin(model, steps)
    labels = torch.arange(batch["input_ids"].shape[0]) % 2
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        loss.backward()
        dt.after_backward(model, opt)
        opt.step()
        dt.step(model, opt)
        opt.zero_grad()
    return start, {k: v.detach().clone() for k, v in model.state_dict().items() if ".deltas." in k}


@pytest.mark.parametrize("name", list(METHODS))
def test_checkpointing_gives_the_same_adapter(minilm_dir, minilm_batch, name):
    start, ref = train(minilm_dir, minilm_batch, METHODS[name], None)
    # training happened (and, for the resizing methods, the shapes may have changed)
    assert any(k not in start or v.shape != start[k].shape or not torch.equal(v, start[k]) for k, v in ref.items())
    for mode in ("non-reentrant", "reentrant"):
        _, got = train(minilm_dir, minilm_batch, METHODS[name], mode)
        assert got.keys() == ref.keys(), mode
        for k, v in ref.items():
            torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-4, msg=f"{mode}: {k}")
