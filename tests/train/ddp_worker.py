"""Worker for tests/train/test_ddp.py: LoRA-train MiniLM on fixed SST-2 rows and save the adapter.

Under ``torchrun`` (WORLD_SIZE > 1) every rank saves its own copy to ``OUT/rank<r>``; a plain run saves to
``OUT/single``. Model dropout and LoRA dropout are 0 and the data order is fixed, so a 2-rank run with batch 4 must
match a single run with batch 8, and so must 2 ranks with batch 2 and 2 accumulated micro-batches.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import deltatune as dt
from deltatune.train import TrainArgs, encode_classification, read_rows, set_seed, train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--method", default="lora", choices=["lora", "adalora", "spiel"])
    opts = parser.parse_args()
    torch.set_num_threads(1)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune.zoo import minilm_path

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    examples, _ = encode_classification(read_rows(opts.data, opts.rows), tok, "sentence", "label", max_length=64)

    set_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, local_files_only=True)
    if opts.method == "adalora":  # budget decisions every step, final pattern shrunk at step T - t_final
        method = dt.AdaLoRA(init_r=6, target_r=3, t_init=1, t_final=2, targets=["query", "value"],
                            modules_to_save=["classifier"])
    elif opts.method == "spiel":  # prune / regrow at steps 1 (everything), 5: rank 0's candidates decide
        method = dt.SpIEL(density=0.002, targets=["query", "value"], reselection_steps=4, accumulation_steps=2,
                          modules_to_save=["classifier"])
    else:
        method = dt.LoRA(r=4, alpha=8, dropout=0.0, modules_to_save=["classifier"])
    dt.attach(model, method)
    args = TrainArgs(lr=1e-3, batch_size=opts.batch_size, grad_accum=opts.grad_accum, max_steps=opts.steps,
                     shuffle=False, progress=False, plot=False, save_adapter=False)
    eval_set = examples[: 2 * opts.rows // 3]  # evaluated in shards under DDP, combined over ranks
    result = train(model, examples, args, eval_data=eval_set)

    name = f"rank{dist.get_rank()}" if distributed else "single"
    from deltatune.budget import broadcast_

    probe = torch.tensor([float(dist.get_rank() if distributed else 0) + 1.0])
    broadcast_([probe])  # controllers decide from rank 0's scores: every rank must read rank 0's values
    dt.save(model, Path(opts.out) / name)
    (Path(opts.out) / name / "result.json").write_text(json.dumps(
        {"world_size": result["world_size"], "losses": [r["loss"] for r in result["history"] if "loss" in r],
         "ranks": [r.get("rank") for r in result["history"] if "loss" in r], "probe": probe.item(),
         "eval": result["eval"]}))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
