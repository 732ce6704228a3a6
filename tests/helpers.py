"""Helpers shared by the test files (not a test file): where the shared models and data live, model builders,
batches of real SST-2 sentences and a bare training loop. Fixtures live in ``conftest.py``; test files import
from here, never from each other."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import deltatune as dt
from deltatune.train import set_seed

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


def random_gated(out_f: int, in_f: int, r: int, scale: float) -> dt.GatedSVDDelta:
    """A gated delta with every P, lam, Q entry drawn from N(0, 1) (seed first)."""
    d = dt.GatedSVDDelta(out_f, in_f, r, scale=scale)
    with torch.no_grad():
        for p in (d.P, d.lam, d.Q):
            p.normal_()
    return d


def set_random_values(model, name, std=0.02, seed=0):
    """Give an adapter's trainable tensors random values (as if trained)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in dt.deltas(model, name).values():
            for p in d.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def real_weight(minilm_dir, name="encoder.layer.2.intermediate.dense"):
    m = make_minilm(minilm_dir)
    layer = m.bert.get_submodule(name.removeprefix("bert."))
    return layer.weight.detach().clone(), layer.bias.detach().clone()


def assert_close_to_scale(a, b):
    """Equal up to float32 rounding at the scale of ``b``."""
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def grads_of(fn, *tensors):
    for t in tensors:
        t.grad = None
    fn().pow(2).sum().backward()
    return [t.grad.clone() for t in tensors]


SST2 = DATA / "glue" / "SST-2"


ALPACA = DATA / "alpaca" / "alpaca_5000.json"


def tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def minilm(path, seed=0, dropout=None):
    from transformers import AutoModelForSequenceClassification

    set_seed(seed)
    kw = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True, **kw)


def state_snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_entries(model, snap) -> list[str]:
    return [k for k, v in model.state_dict().items() if not torch.equal(v, snap[k])]


def state_without(model, drop=()):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
            if not any(k.startswith(d) for d in drop)}


def mixed_structures(minilm_dir):
    model = make_minilm(minilm_dir)
    for name, method in {"lora": dt.LoRA(r=4, targets=["query", "value"]),
                         "spiel": dt.SpIEL(density=0.001, targets=["value", "intermediate.dense"]),
                         "s2ft": dt.S2FT(v_ratio=0.1, o_ratio=0.1, d_ratio=0.02),
                         "oft": dt.OFT(block_size=32, targets=["query"])}.items():
        dt.attach(model, method, name=name, activate=False)
        randomize(model, name, std=0.02, seed=len(name))
    return model


def run_one_and_two_ranks(worker: Path, args: list[str], one: Path, two: Path, timeout: int = 600) -> None:
    """Run ``worker`` (a script taking ``--out``) in one process writing to ``one`` and under ``torchrun`` on 2
    gloo ranks writing to ``two``; fail with the output tail if either exits non-zero."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    for cmd in ([sys.executable, str(worker), *args, "--out", str(one)],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
                 *args, "--out", str(two)]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
