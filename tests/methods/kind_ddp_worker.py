"""Worker for tests/methods/test_kind.py: train a KIND adapter on MiniLM with a per-row task id, under DDP.

Rows are fixed; step ``s`` uses rows ``8s .. 8s + 7`` with task ``row % 3``; rank ``r`` of 2 takes half of them, so a
2-rank run with batch 4 must match one process with batch 8. Saves the trainable tensors (``rank<r>.safetensors``)
and, in the single run, the initial ones (``init.safetensors``).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import deltatune as dt
from deltatune.train import read_rows, set_seed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--steps", type=int, default=3)
    opts = p.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune.zoo import minilm_path

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    rows = read_rows(opts.data, 8 * opts.steps)
    set_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, local_files_only=True)
    dt.attach(model, dt.KIND(n_classes=3, n_tailors=2, n_learngenes=8, targets=["query", "value"],
                             condition="task"), name="kind")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    named = {n: q for n, q in model.named_parameters() if q.requires_grad}
    if world == 1:
        save_file({n: q.detach().clone().contiguous() for n, q in named.items()}, out / "init.safetensors")
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(named.values(), lr=1e-3)
    for s in range(opts.steps):
        lo = 8 * s + rank * opts.batch_size
        chunk = rows[lo: lo + opts.batch_size]
        enc = tok([r["sentence"] for r in chunk], padding="max_length", max_length=32, truncation=True,
                  return_tensors="pt")
        labels = torch.tensor([int(r["label"]) for r in chunk])
        task = torch.arange(lo, lo + opts.batch_size) % 3
        logits = net(**enc, condition=task).logits
        torch.nn.functional.cross_entropy(logits, labels).backward()
        opt.step()
        opt.zero_grad()
    save_file({n: q.detach().clone().contiguous() for n, q in named.items()}, out / f"rank{rank}.safetensors")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
