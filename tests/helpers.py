"""Helpers shared by the test files (not a test file): where the shared models and data live, model builders,
batches of real SST-2 sentences and a bare training loop. Fixtures live in ``conftest.py``; test files import
from here, never from each other."""
from __future__ import annotations

import os
from pathlib import Path

import torch

import deltatune as dt

#: the repository root (tests may sit in subfolders: paths go through here, not ``__file__``)
ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DELTATUNE_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"


def make_minilm(path, num_labels=2, seed=0):
    from transformers import AutoModelForSequenceClassification  # optional dependency (the "test" extra)

    torch.manual_seed(seed)  # the classification head is freshly initialized: seed it
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels).eval()


def make_smollm(path):
    from transformers import AutoModelForCausalLM  # optional dependency (the "test" extra)

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def randomize(model, name, std=0.02, seed=1):
    """Give adapter ``name`` non-zero trainable factors so tests see its effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in dt.deltas(model, name).values():
            for p in d.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def sst2_batches(model_dir, rows, n=4, size=8, offset=0, labels=True, max_length=48):
    """``n`` tokenized batches of ``size`` consecutive ``(text, label)`` rows from ``rows[offset:]``, padded;
    truncated to ``max_length`` tokens (``None``: not truncated); with their ``labels`` when asked."""
    from transformers import AutoTokenizer  # optional dependency (the "test" extra)

    tok = AutoTokenizer.from_pretrained(model_dir)
    trunc = dict(truncation=True, max_length=max_length) if max_length is not None else {}
    out = []
    for i in range(n):
        chunk = rows[offset + i * size: offset + (i + 1) * size]
        b = dict(tok([t for t, _ in chunk], padding=True, return_tensors="pt", **trunc))
        if labels:
            b["labels"] = torch.tensor([y for _, y in chunk])
        out.append(b)
    return out


def train_loop(model, batches, steps, lr=5e-3, opt=None, clip=None, after=None):
    """A bare PyTorch loop: the only deltatune call is dt.step after optimizer.step."""
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for t in range(steps):
        loss = model(**batches[t % len(batches)]).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
        opt.step()
        dt.step(model, opt)
        if after:
            after(t)
        opt.zero_grad(set_to_none=True)
    model.eval()
    return opt
