"""Worker for tests/test_routed_training.py: train four MiniLM adapters for 3 steps on one routed batch of 8 SST-2
rows (``model(**batch, adapter_names=[...])``), under plain DDP (``torchrun``, gloo, each rank its half of the batch)
or in one process (the whole batch). Writes the trained adapter tensors to ``OUT/rank<r>.pt`` (and the starting
values to ``OUT/start.pt``) and which adapters had no rows on the rank to ``OUT/rank<r>.json``.

Each rank's loss is its rows' cross-entropy sum times ``world_size / 8`` (DDP averages the gradients over the ranks),
so one process and two ranks optimize the same objective. Model dropout is 0 and the adapters have none."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import deltatune as dt
from deltatune.train import read_rows

#: the routed batch; rank 0 gets rows 0-3 (no "vera" row), rank 1 rows 4-7 (no "lora" row); "unused" has no row
NAMES = ["lora", "s2ft", None, "lora", "vera", "s2ft", "base", "vera"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune.zoo import minilm_path

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    rows = read_rows(opts.data, len(NAMES))
    batch = dict(tok([r["sentence"] for r in rows], padding=True, return_tensors="pt"))
    labels = torch.tensor([int(r["label"]) for r in rows])

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, local_files_only=True)
    methods = {"lora": dt.LoRA(r=4, targets=["query", "value"], modules_to_save=["classifier"]),
               "s2ft": dt.S2FT(v_ratio=0.1, o_ratio=0.1, d_ratio=0.02), "vera": dt.VeRA(r=16, targets=["value"]),
               "unused": dt.LoRA(r=2, targets=["value"])}
    for k, (name, method) in enumerate(methods.items()):
        dt.attach(model, method, name=name, activate=False)
        g = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for d in dt.deltas(model, name).values():
                for p in d.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
    dt.set_active(model, list(methods))
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    trained = lambda: {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    if rank == 0:
        torch.save(trained(), out / "start.pt")

    share = len(NAMES) // world
    mine = slice(rank * share, (rank + 1) * share)
    names = NAMES[mine]
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()
    for _ in range(3):
        logits = net(**{k: v[mine] for k, v in batch.items()}, adapter_names=names).logits
        loss = F.cross_entropy(logits, labels[mine], reduction="sum") * world / len(NAMES)  # DDP averages
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.save(trained(), out / f"rank{rank}.pt")
    absent = [n for n in methods if n != "unused" and n not in names]
    (out / f"rank{rank}.json").write_text(json.dumps({"absent": absent, "world": world}))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
