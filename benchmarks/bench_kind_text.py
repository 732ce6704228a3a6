#!/usr/bin/env python
"""KIND on text: one MiniLM-L6 trained on three GLUE tasks at once (SST-2, MRPC, RTE), the task id known at
inference, against one LoRA per task and one shared LoRA, at matched trainable parameters.

Arms (``--arms``):

- ``kind``: ``dt.KIND(n_classes=3, n_learngenes=12, n_tailors=4, init="zeros", condition="task")``: 12 shared
  learngenes and 4 tailors per task on every target matrix; every batch mixes tasks, each row gated by its own task
  id (``model(**batch, condition=task)``): ``(12 + 3 x 4) (in + out + 1)`` parameters per matrix;
- ``kind-svd``: the same with ``init="svd"`` (KIND v1: components from the SVD of the pretrained weights, anchored;
  each task starts without the other tasks' tailor components);
- ``lora-per-task``: ``dt.LoRA(r=8, alpha=16)``, one model per task trained on that task alone (three models:
  ``3 x 8 (in + out)`` per matrix in all);
- ``lora-shared``: ``dt.LoRA(r=24, alpha=48)``, one model on the mixture with no task information in the backbone.

Every arm has one 6-way head (``modules_to_save=["classifier"]``, trained in full) read as three 2-way heads: task
``t`` uses logits ``2t, 2t + 1``, so the heads are per task for everyone and only the backbone differs.

Protocol: per task a seeded random ``--rows`` training rows (10 % of them held out for choosing the learning rate,
never the dev set), ``--epochs`` epochs, batch 32 (mixed tasks), max length 128, AdamW, linear decay after 6 %
warm-up. The learning rate of each arm is the best mean held-out accuracy over ``--lrs`` (seed 0); that run is
seed 0, and ``--seeds`` more seeds run at the chosen rate. Reported: dev accuracy per task and mean, mean +- sd over
seeds, trainable parameters, and time per step relative to ``lora-shared`` (measured in the same process, not
interleaved: treat small differences as noise). Results: ``benchmarks/results/kind/text.json``; each finished run
is cached there, so the script resumes where it stopped.

    python benchmarks/bench_kind_text.py                     # default: 4 arms, lrs 3e-4 1e-3 3e-3, 3 seeds
    python benchmarks/bench_kind_text.py --quick --no-write  # smoke test: a few steps of everything
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_modular import TARGETS, TASKS, sample, task_rows  # noqa: E402
from common import REPO, header, md_table, update_section  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.train import Collator, encode_classification, label_map, set_seed  # noqa: E402
from deltatune.zoo import minilm_path  # noqa: E402

TASK_NAMES = ("sst2", "mrpc", "rte")
RESULTS = REPO / "benchmarks" / "results" / "kind"
ARMS = {
    "kind": lambda: dt.KIND(n_classes=3, n_learngenes=12, n_tailors=4, init="zeros", condition="task",
                            targets=TARGETS, modules_to_save=["classifier"]),
    "kind-svd": lambda: dt.KIND(n_classes=3, n_learngenes=12, n_tailors=4, init="svd", condition="task",
                                targets=TARGETS, modules_to_save=["classifier"]),
    "lora-per-task": lambda: dt.LoRA(r=8, alpha=16, targets=TARGETS, modules_to_save=["classifier"]),
    "lora-shared": lambda: dt.LoRA(r=24, alpha=48, targets=TARGETS, modules_to_save=["classifier"]),
}
CONDITIONED = ("kind", "kind-svd")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load(tok, args) -> dict:
    """Per task: train / held-out / dev examples, each with its ``task`` id."""
    out = {}
    for t, name in enumerate(TASK_NAMES):
        spec = TASKS[name]
        train_all = task_rows(name, "train")
        label2id = label_map([r[spec["label"]] for r in train_all])
        rows = sample(train_all, args.rows, f"kind-{name}-train")
        random.Random(f"kind-{name}-split").shuffle(rows)
        n_hold = max(1, len(rows) // 10)
        splits = {"heldout": rows[:n_hold], "train": rows[n_hold:],
                  "dev": sample(task_rows(name, "dev"), args.dev_rows, f"kind-{name}-dev")}
        enc = {}
        for split, part in splits.items():
            ex, _ = encode_classification(part, tok, spec["text"], spec["label"], text_pair=spec["pair"],
                                          max_length=args.max_length, label2id=label2id, source=f"{name} {split}")
            enc[split] = [{**e, "task": t} for e in ex]
        out[name] = enc
    return out


def model_for(arm: str, seed: int):
    from transformers import AutoModelForSequenceClassification

    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2 * len(TASK_NAMES),
                                                               local_files_only=True)
    dt.attach(model, ARMS[arm](), name=arm)
    return model


def task_logits(model, batch: dict, conditioned: bool) -> torch.Tensor:
    """Each row's 2-way logits of its own task."""
    task = batch["task"]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "task")}
    logits = model(**inputs, **({"condition": task} if conditioned else {})).logits
    return logits.view(len(task), -1, 2)[torch.arange(len(task)), task]


def fit(model, examples: list, lr: float, seed: int, args, conditioned: bool, collate) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = []
    g = random.Random(seed)
    for _ in range(args.epochs):
        idx = list(range(len(examples)))
        g.shuffle(idx)
        order += idx
    batches = [order[i:i + args.batch] for i in range(0, len(order), args.batch)]
    if args.quick:
        batches = batches[:3]
    total, warm = len(batches), max(1, int(0.06 * len(batches)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    model.train()
    times, losses = [], []
    for b in batches:
        batch = collate([examples[i] for i in b])
        t0 = time.perf_counter()
        loss = F.cross_entropy(task_logits(model, batch, conditioned), batch["labels"])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    model.eval()
    return {"steps": total, "step_time": statistics.median(times), "last_loss": sum(losses[-10:]) / len(losses[-10:])}


@torch.no_grad()
def accuracy(model, examples: list, conditioned: bool, collate) -> float:
    if not examples:
        return float("nan")
    examples = sorted(examples, key=lambda e: len(e["input_ids"]))
    right = 0
    for i in range(0, len(examples), 64):
        batch = collate(examples[i:i + 64])
        right += int((task_logits(model, batch, conditioned).argmax(-1) == batch["labels"]).sum())
    return right / len(examples)


def run(arm: str, lr: float, seed: int, data: dict, args, collate) -> dict:
    """One training run of ``arm``: per task held-out and dev accuracy, trainable parameters, step time."""
    conditioned = arm in CONDITIONED
    rec = {"arm": arm, "lr": lr, "seed": seed, "heldout": {}, "dev": {}}
    if arm == "lora-per-task":
        trainable, times = 0, []
        for name in TASK_NAMES:
            model = model_for(arm, seed)
            trainable += dt.trainable_parameters(model)[0]
            fitted = fit(model, data[name]["train"], lr, seed, args, False, collate)
            times.append(fitted["step_time"])
            rec["heldout"][name] = accuracy(model, data[name]["heldout"], False, collate)
            rec["dev"][name] = accuracy(model, data[name]["dev"], False, collate)
        rec.update(trainable=trainable, step_time=statistics.mean(times))
    else:
        model = model_for(arm, seed)
        mixture = [e for name in TASK_NAMES for e in data[name]["train"]]
        fitted = fit(model, mixture, lr, seed, args, conditioned, collate)
        rec.update(trainable=dt.trainable_parameters(model)[0], step_time=fitted["step_time"])
        for name in TASK_NAMES:
            rec["heldout"][name] = accuracy(model, data[name]["heldout"], conditioned, collate)
            rec["dev"][name] = accuracy(model, data[name]["dev"], conditioned, collate)
    rec["heldout_mean"] = statistics.mean(rec["heldout"].values())
    rec["dev_mean"] = statistics.mean(rec["dev"].values())
    return rec


def mean_sd(xs: list[float]) -> str:
    return f"{100 * statistics.mean(xs):.1f} +- {100 * (statistics.stdev(xs) if len(xs) > 1 else 0):.1f}"


def report(results: dict, args) -> str:
    rows, chosen = [], {}
    base_time = None
    for arm in args.arms:
        sweep = {lr: results.get(key(arm, lr, 0)) for lr in args.lrs}
        sweep = {lr: r for lr, r in sweep.items() if r is not None}
        if not sweep:
            continue
        lr = max(sweep, key=lambda v: sweep[v]["heldout_mean"])
        runs = [results[k] for s in range(args.seeds) if (k := key(arm, lr, s)) in results]
        chosen[arm] = (lr, runs)
        if arm == "lora-shared":
            base_time = statistics.mean(r["step_time"] for r in runs)
    for arm, (lr, runs) in chosen.items():
        t = statistics.mean(r["step_time"] for r in runs)
        rows.append([arm, f"{lr:g}", str(len(runs)), f"{runs[0]['trainable']:,}",
                     *[mean_sd([r["dev"][n] for r in runs]) for n in TASK_NAMES],
                     mean_sd([r["dev_mean"] for r in runs]),
                     f"{t / base_time:.2f}" if base_time else "n/a"])
    sweeps = [[arm, *[f"{100 * results[key(arm, lr, 0)]['heldout_mean']:.1f}" if key(arm, lr, 0) in results
                      else "-" for lr in args.lrs]] for arm in args.arms]
    return "\n".join([
        header("KIND on text (issue 18): multi-task MiniLM, task id known at inference"),
        f"- setup: MiniLM-L6, SST-2 + MRPC + RTE, {args.rows} training rows per task (10 % held out for the "
        f"learning rate), {args.epochs} epochs, batch {args.batch}, max length {args.max_length}; dev: "
        f"{args.dev_rows or 'all'} rows per task; per-task 2-way heads (one 6-way head) trained in full by every arm",
        "- arms: `kind` (12 learngenes + 4 tailors per task, `init='zeros'`), `kind-svd` (same, SVD of the "
        "pretrained weights), `lora-per-task` (r=8, three models), `lora-shared` (r=24, no task id); step time "
        "relative to lora-shared, per optimizer step (lora-per-task: its models' steps see one task's rows)",
        "",
        md_table(["arm", "lr", "seeds", "trainable", *[f"{n} dev acc %" for n in TASK_NAMES], "mean %",
                  "step time"], rows),
        "",
        "Learning-rate sweep (seed 0, mean held-out accuracy %, from the training rows):",
        "",
        md_table(["arm", *[f"lr {lr:g}" for lr in args.lrs]], sweeps),
        "",
    ])


def key(arm: str, lr: float, seed: int) -> str:
    return f"{arm}|{lr:g}|{seed}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--dev-rows", type=int, default=None)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "text.json"))
    p.add_argument("--quick", action="store_true", help="3 steps per run, 64 rows, 1 seed, 1 lr (smoke test)")
    p.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.dev_rows, args.seeds, args.lrs, args.max_length = 64, 32, 1, args.lrs[:1], 64
        args.out = str(Path(args.out).with_name("text-quick.json"))
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    data = load(tok, args)
    collate = Collator(tok.pad_token_id)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("rows", "dev_rows", "epochs", "batch", "max_length")}
    stored = json.loads(out.read_text()) if out.exists() else {}
    results = stored.get("runs", {}) if stored.get("settings") == settings else {}

    def save():
        out.write_text(json.dumps({"settings": settings, "runs": results}, indent=1) + "\n")

    for arm in args.arms:
        for lr in args.lrs:
            if key(arm, lr, 0) not in results:
                log(f"{arm}: lr {lr:g}, seed 0")
                results[key(arm, lr, 0)] = run(arm, lr, 0, data, args, collate)
                save()
            log(f"{arm} lr {lr:g}: held-out {results[key(arm, lr, 0)]['heldout_mean']:.3f}")
        best = max(args.lrs, key=lambda v: results[key(arm, v, 0)]["heldout_mean"])
        for s in range(1, args.seeds):
            if key(arm, best, s) not in results:
                log(f"{arm}: lr {best:g}, seed {s}")
                results[key(arm, best, s)] = run(arm, best, s, data, args, collate)
                save()
    body = report(results, args)
    print(body)
    if not args.no_write and not args.quick:
        update_section("kind-text", body)
    assert all(math.isfinite(r["dev_mean"]) for r in results.values())


if __name__ == "__main__":
    main()
