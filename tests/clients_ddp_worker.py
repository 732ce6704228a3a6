"""Worker for tests/test_hf.py: AdaLoRA in a user's own accelerate loop (no deltatune trainer).

Run under ``torchrun --nproc_per_node 2``: ``accelerate.prepare`` wraps the model in ``DistributedDataParallel``.
First ``dt.begin(..., resizable=True)`` is checked to be refused at ``dt.step``; then ``dt.begin`` with
``resizable`` unset trains through AdaLoRA's pruning. Each rank writes its adapter and what it saw to
``OUT/rank<r>``.
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

import deltatune as dt
from deltatune.train import Collator, encode_classification, read_rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=5)
    opts = parser.parse_args()
    torch.set_num_threads(1)

    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune.zoo import minilm_path

    acc = Accelerator(cpu=True)
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    examples, _ = encode_classification(read_rows(opts.data, 4 * opts.steps), tok, "sentence", "label", max_length=24)
    collate = Collator(tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, local_files_only=True)
    dt.attach(model, dt.AdaLoRA(init_r=4, target_r=2, t_init=1, t_final=3, targets=["query", "value"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, optimizer = acc.prepare(model, optimizer)
    rank, world = acc.process_index, acc.num_processes

    def train_step(i: int) -> bool:
        batch = collate(examples[4 * i + 2 * rank: 4 * i + 2 * rank + 2])
        loss = model(**batch).loss
        acc.backward(loss)
        dt.after_backward(model, optimizer)
        optimizer.step()
        try:
            return dt.step(model, optimizer)
        finally:
            optimizer.zero_grad()

    dt.begin(model, opts.steps, resizable=True)
    try:
        train_step(0)
        refused = None
    except ValueError as e:
        refused = str(e)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dt.begin(model, opts.steps)
        dt.begin(model, opts.steps)  # the notice comes once
    changed = [train_step(i) for i in range(opts.steps)]
    out = Path(opts.out) / f"rank{rank}"
    dt.save(model, out)
    (out / "result.json").write_text(json.dumps({
        "world": world, "wrapper": type(model).__name__, "refused": refused, "changed": changed,
        "notices": [str(w.message) for w in caught if "deltatune" in str(w.message)],
        "ranks": {k: int(d.mask.sum()) if hasattr(d, "mask") else None for k, d in dt.deltas(model, "default").items()},
    }))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
