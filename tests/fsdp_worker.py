"""Worker for tests/test_fsdp.py: train MiniLM adapters of several structures for 3 steps on 8 SST-2 rows, under
FSDP2 (``torchrun``, gloo, ``fully_shard`` on every encoder layer and then the root, each rank its half of the
batch) or in one process (the whole batch). For each method writes the trained adapter (gathered) to
``OUT/<method>.pt`` and, from rank 0, the adapter folder ``dt.save`` wrote from the sharded model to
``OUT/<method>/``; ``OUT/refusals.json`` records the errors of the calls that must refuse a sharded model.

Each rank's loss is its rows' mean cross-entropy (FSDP2 averages gradients over ranks), so one process on the whole
batch and two ranks optimize the same objective. Dropout is 0."""
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

T = ["query", "value"]
METHODS = {
    "lora": lambda: dt.LoRA(r=4, targets=T, modules_to_save=["classifier"]),
    "adalora": lambda: dt.AdaLoRA(init_r=6, target_r=3, t_init=1, t_final=1, delta_t=1, total_step=3, targets=T,
                                  shrink="never"),
    "s2ft": lambda: dt.S2FT(v_ratio=0.1, o_ratio=0.1, d_ratio=0.02),
    "spiel": lambda: dt.SpIEL(density=0.005, reselection_steps=100, targets=T),
    "oft": lambda: dt.OFT(block_size=32, targets=T),
    "vera": lambda: dt.VeRA(r=16, targets=T),
    "orthogonal": lambda: dt.OrthogonalAdaptation(r=4, targets=T),
    "sorsa": lambda: dt.SORSA(r=4, gamma=0.1, targets=T),
}


def gathered(model) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        if ".deltas." in k:
            out[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", default=",".join(METHODS))
    opts = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune.zoo import minilm_path

    world = int(os.environ.get("WORLD_SIZE", "1"))
    mesh = None
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))  # always name the mesh's device: the default picks an accelerator
    rank = dist.get_rank() if world > 1 else 0
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    rows = read_rows(opts.data, 8)
    batch = dict(tok([r["sentence"] for r in rows], padding=True, return_tensors="pt"))
    labels = torch.tensor([int(r["label"]) for r in rows])
    lo, hi = rank * 8 // world, (rank + 1) * 8 // world
    mine = {k: v[lo:hi] for k, v in batch.items()}
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    refusals = {}
    for name in opts.methods.split(","):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, local_files_only=True)
        dt.attach(model, METHODS[name](), name="a")
        if mesh is not None:
            from torch.distributed.fsdp import fully_shard
            for layer in model.bert.encoder.layer:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)  # after sharding
        dt.begin(model, 3)
        for _ in range(3):
            loss = F.cross_entropy(model(**mine).logits, labels[lo:hi])
            loss.backward()
            dt.after_backward(model, opt)
            opt.step()
            dt.step(model, opt)
            opt.zero_grad()
        state = gathered(model)
        dt.save(model, out / name)  # every rank calls it (the gather is collective); rank 0 writes
        if rank == 0:
            torch.save(state, out / f"{name}.pt")
        if mesh is not None and name == "lora":
            for what, call in (("merge", lambda: dt.merge(model)), ("attach", lambda: dt.attach(
                    model, dt.LoRA(r=2, targets=T), name="b")), ("load", lambda: dt.load(model, out / name, name="c"))):
                try:
                    call()
                    refusals[what] = None
                except Exception as e:  # noqa: BLE001 - the test reads the message
                    refusals[what] = f"{type(e).__name__}: {e}"
        if mesh is not None and name == "adalora":  # a resize after sharding would be silently undone: refused
            delta = next(iter(dt.deltas(model, "a").values()))
            try:
                delta.keep_(torch.tensor([0, 1]))
                refusals["resize"] = None
            except Exception as e:  # noqa: BLE001
                refusals["resize"] = f"{type(e).__name__}: {e}"
    if rank == 0:
        (out / "refusals.json").write_text(json.dumps(refusals))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
