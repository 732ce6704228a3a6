#!/usr/bin/env python
"""Modular customization (Orthogonal Adaptation, Po et al., CVPR 2024) on MiniLM-L6 and four GLUE tasks.

Train one adapter per task *independently* (SST-2, MRPC, RTE, SUBJ), each with its own fresh 2-way
classification head (``modules_to_save``: the head trains in full and is never merged). Then sum the tasks'
backbone deltas into ONE backbone, ``theta + lam * sum_i dW_i``, and evaluate every task's dev accuracy on that
merged backbone with ITS OWN head (every ``modules_to_save`` module of that task's adapter is put on the merged
backbone when the task is evaluated). Reported per task and method: individual dev accuracy (the task's adapter
alone, loaded back from its checkpoint), merged dev accuracy per lambda, and retention = merged / individual.
Training is the cost, evaluation is cheap: adapters are cached in ``--out`` (``dt.save``) and ``--reuse`` loads
them back, so other lambdas (``--lams``) can be evaluated without retraining.

Methods (``--methods``; every method sees the same rows, seed and data order per task):

- ``lora``: ``dt.LoRA(r=8, alpha=16)`` on the encoder's linear layers, lr 1e-3;
- ``orthogonal``: ``dt.OrthogonalAdaptation(r=8, slot=i, basis_seed=0)`` on the same layers (alpha = r): task i
  (its index in ``TASKS``, whatever ``--tasks`` selects) gets the i-th block of r columns of one shared, seeded
  orthogonal basis as its frozen input-side factor A; only B trains, so it gets a larger lr, 3e-3;
- ``ties``: the ``lora`` adapters (reused, not retrained) merged with TIES (density 0.2) instead of the plain sum.

Choices:

- targets: the encoder layers' attention query / key / value / output dense and FFN intermediate / output dense
  (``TARGETS``: 6 layers x 6 = 36 matrices). The embeddings, the pooler and the classifier are not targeted.
- pooler: all-MiniLM-L6-v2 ships pretrained pooler weights (``pooler.dense``), so by default (``--pooler frozen``)
  it stays frozen and shared: each task's head is its 770-parameter ``classifier`` only, and everything a task
  learns beyond that is in the merged backbone delta. ``--pooler head`` trains it in full per task with the
  classifier (a per-task, unmerged 148k-parameter layer: it helps retention for reasons that have nothing to do
  with the adapters); ``--pooler adapt`` targets it with the adapter (merged like the encoder).
- seeds: task i trains with seed ``--seed + i`` (head init, adapter init, data order; the same for every method).
  One seed for all tasks would start all four LoRA A matrices identical, correlating the tasks' input subspaces,
  which is not what independent training by different users looks like.
- tasks: SST-2 (sentiment), MRPC (paraphrase), RTE (entailment), SUBJ (subjectivity, from classification_extra;
  CoLA, the first choice, stays at its majority class with this budget: ``--tasks sst2,mrpc,rte,cola`` runs it).
- data: a seeded random subset of ``--rows`` (3,000) training rows per task (GLUE files are partly sorted, e.g.
  CoLA by source; RTE has 2,490 in all), 2 epochs, batch 32, max length 128 (MRPC and RTE as sentence pairs), AdamW, linear decay after 6 %
  warm-up; the full dev sets (``--dev-rows`` caps them by a seeded sample). CoLA is scored by accuracy here (GLUE
  uses Matthews correlation); the table gives each dev set's majority-class accuracy for reference.
- also reported: the pairwise |cosine| of the tasks' whole backbone deltas (exactly 0 up to rounding for
  orthogonal slots: ``A_i A_j^T = 0`` makes ``<dW_i, dW_j>_F = 0``; small but not 0 for independent LoRAs).
- merging: dense deltas in float32, summed per module; the individual number comes from the adapter itself
  (unmerged forward), and before evaluating merged models the script checks on one dev batch that "base + own delta
  + own head" built the merging way gives the adapter's logits.

    python benchmarks/bench_modular.py                          # lora, orthogonal, ties; 4 tasks; lambda 1.0 and 0.6
    python benchmarks/bench_modular.py --reuse --lams 1.0,0.8,0.6,0.4 --no-write   # re-evaluate, no training
    python benchmarks/bench_modular.py --methods lora --tasks sst2,mrpc --rows 64 --dev-rows 64 --no-write  # smoke

The default run trains 8 adapters of up to 188 steps; about 35 minutes on 2 otherwise idle cores (training the MRPC
and RTE sentence pairs costs most; evaluation about 1 minute per method).
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, REPO, header, md_table, update_section  # noqa: E402

import torch  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.combine import ties  # noqa: E402
from deltatune.model import linear_weight  # noqa: E402
from deltatune.train import (  # noqa: E402
    Collator, TrainArgs, encode_classification, eval_loader, evaluate, label_map, read_rows, set_seed, train)
from deltatune.zoo import minilm_path  # noqa: E402

# -- tasks ---------------------------------------------------------------------------------------------------------
# folder under glue/, text column, second text column for sentence pairs, label column; CoLA has no header line
TASKS: dict[str, dict] = {
    "sst2": {"folder": "SST-2", "text": "sentence", "pair": None, "label": "label"},
    "mrpc": {"folder": "MRPC", "text": "#1 String", "pair": "#2 String", "label": "Quality"},
    "rte": {"folder": "RTE", "text": "sentence1", "pair": "sentence2", "label": "label"},
    "subj": {"folder": "../classification_extra/SUBJ", "text": "sentence", "pair": None, "label": "label",
             "columns": ("label", "sentence")},
    "cola": {"folder": "CoLA", "text": "sentence", "pair": None, "label": "label",
             "columns": ("source", "label", "orig", "sentence")},
}
#: the default four: CoLA stays at its majority class with this training budget, so SUBJ (subjectivity) is the fourth
DEFAULT_TASKS = ("sst2", "mrpc", "rte", "subj")

# -- methods -------------------------------------------------------------------------------------------------------
# The encoder's linear layers: attention q / k / v / output dense, FFN intermediate / output dense (36 in MiniLM-L6).
LAYERS = r"attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense"
TARGETS = rf".*encoder\.layer\.\d+\.({LAYERS})"
TARGETS_WITH_POOLER = rf"(.*encoder\.layer\.\d+\.({LAYERS})|.*pooler\.dense)"
HEAD = ["classifier"]
POOLER = ["pooler.dense"]


def lora(slot: int, targets, saved: list[str]) -> dt.Method:
    return dt.LoRA(r=8, alpha=16, targets=targets, modules_to_save=saved)


def orthogonal(slot: int, targets, saved: list[str]) -> dt.Method:
    cls = getattr(dt, "OrthogonalAdaptation", None)
    if cls is None:
        raise SystemExit("method 'orthogonal' needs dt.OrthogonalAdaptation, which this deltatune does not have yet")
    return cls(r=8, slot=slot, basis_seed=0, targets=targets, modules_to_save=saved)


#: name -> factory(slot = the task's index in TASKS, targets, modules_to_save) -> method config
METHODS: dict[str, Callable[[int, object, list[str]], dt.Method]] = {
    "lora": lora,
    "orthogonal": orthogonal,
}
#: method name -> the method whose adapters it merges (a merge-only method such as "ties" reuses "lora"'s)
TRAINS_AS: dict[str, str] = {"ties": "lora"}
TIES_DENSITY = 0.2  # the TIES paper's default k = 20 %
#: peak learning rates (``--lr`` overrides all); Orthogonal Adaptation trains B only against a frozen A
LR = {"lora": 1e-3, "orthogonal": 3e-3}


def sum_merge(dense: dict[str, dict[str, torch.Tensor]], lam: float) -> dict[str, torch.Tensor]:
    """``{tensor key: lam * sum over tasks}`` of the tasks' backbone deltas ``{task: {key: dW}}``."""
    out: dict[str, torch.Tensor] = {}
    for per_task in dense.values():
        for key, d in per_task.items():
            out[key] = out[key] + d if key in out else d.clone()
    return {key: lam * d for key, d in out.items()}


def ties_merge(dense: dict[str, dict[str, torch.Tensor]], lam: float) -> dict[str, torch.Tensor]:
    """TIES (Yadav et al., 2023) per tensor: trim each task's delta to its top 20 % magnitudes, elect the sign by
    total mass, mean over the agreeing tasks, times ``lam`` (:func:`deltatune.combine.ties`)."""
    keys = list(dict.fromkeys(k for per_task in dense.values() for k in per_task))
    return {k: lam * ties([per_task[k] for per_task in dense.values() if k in per_task], density=TIES_DENSITY)
            for k in keys}


#: method name -> how its task deltas combine into one backbone delta (default: ``sum_merge``)
MERGERS: dict[str, Callable] = {"ties": ties_merge}


T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


# -- data ----------------------------------------------------------------------------------------------------------
def task_rows(task: str, split: str) -> list[dict]:
    spec = TASKS[task]
    path = DATA / "glue" / spec["folder"] / f"{split}.tsv"
    if "columns" in spec:  # headerless TSV, no quote handling (as GLUE needs)
        with open(path, encoding="utf-8", newline="") as f:
            return [dict(zip(spec["columns"], r)) for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return read_rows(path)


def sample(rows: list, n: int | None, seed: str) -> list:
    """A seeded random subset of ``n`` rows in file order (all rows when ``n`` is None or not smaller)."""
    if n is None or n >= len(rows):
        return rows
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]


def load_task(task: str, tok, args) -> dict:
    spec = TASKS[task]
    train_all, dev_all = task_rows(task, "train"), task_rows(task, "dev")
    label2id = label_map([r[spec["label"]] for r in train_all])
    enc = {}
    for split, rows, n in (("train", train_all, args.rows), ("dev", dev_all, args.dev_rows)):
        rows = sample(rows, n, f"{args.seed}-{task}-{split}")
        enc[split], _ = encode_classification(rows, tok, spec["text"], spec["label"], text_pair=spec["pair"],
                                              max_length=args.max_length, label2id=label2id, source=f"{task} {split}")
    dev = sorted(enc["dev"], key=lambda ex: len(ex["input_ids"]))  # less padding; accuracy ignores the order
    counts = [sum(ex["labels"] == i for ex in dev) for i in range(len(label2id))]
    return {"train": enc["train"], "dev": dev, "num_labels": len(label2id), "majority": max(counts) / len(dev)}


# -- models ----------------------------------------------------------------------------------------------------------
def base_model(num_labels: int, seed: int):
    from transformers import AutoModelForSequenceClassification

    set_seed(seed)  # the fresh head's initialization
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels,
                                                              local_files_only=True)


def method_config(method: str, slot: int, args) -> dt.Method:
    targets = TARGETS_WITH_POOLER if args.pooler == "adapt" else TARGETS
    saved = HEAD + (POOLER if args.pooler == "head" else [])
    return METHODS[method](slot, targets, saved)


def is_saved(module: str, saved: list[str]) -> bool:
    return any(module == s or module.endswith("." + s) for s in saved)


def train_settings(method: str, task: str, args) -> dict:
    """Everything that determines a trained adapter (a cached one is reused only when this matches)."""
    return {"method": method, "config": repr(method_config(method, list(TASKS).index(task), args)),
            "lr": args.lr or LR[method], "rows": args.rows, "epochs": args.epochs, "batch": args.batch,
            "max_length": args.max_length, "seed": args.seed + list(TASKS).index(task), "task": task}


def train_adapter(method: str, task: str, data: dict, tok, args, folder: Path) -> dict:
    """Train (or, with ``--reuse`` and matching settings, load) the task's adapter; returns its meta record."""
    settings = train_settings(method, task, args)
    meta_path = folder.parent / f"{task}.json"
    if args.reuse and meta_path.exists() and (folder / "adapter_config.json").exists():
        meta = json.loads(meta_path.read_text())
        if meta["settings"] == settings:
            log(f"{method}/{task}: reusing the adapter in {folder}")
            return meta
        log(f"{method}/{task}: the cached adapter was trained with other settings; training again")
    slot = list(TASKS).index(task)
    model = base_model(data["num_labels"], settings["seed"])
    dt.attach(model, method_config(method, slot, args), name=task)
    trainable = dt.trainable_parameters(model)[0]
    targs = TrainArgs(lr=settings["lr"], batch_size=args.batch, epochs=args.epochs, warmup_ratio=0.06,
                      seed=settings["seed"], save_adapter=False, plot=False, progress=sys.stderr.isatty())
    steps = -(-len(data["train"]) // args.batch)
    log(f"{method}/{task}: training on {len(data['train'])} rows ({steps} steps, lr {settings['lr']:g}, "
        f"{trainable:,} trainable parameters)")
    result = train(model, data["train"], targs, collate_fn=Collator(tok.pad_token_id))
    dt.save(model, folder, names=[task])
    meta = {"settings": settings, "trainable": trainable, "steps": result["steps"], "time": result["time"],
            "train_loss": result["train_loss"]}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    log(f"{method}/{task}: trained in {result['time']:.0f} s, last loss {result['train_loss']:.4f}")
    return meta


def build_composed(base, backbone: dict[str, torch.Tensor], head: dict[str, torch.Tensor]):
    """A copy of the plain ``base`` with ``backbone`` deltas added and ``head`` values put in place. Keys are
    ``module:weight`` / ``module:bias``; weights in the linear layout (out x in) as ``Delta.dense()`` gives them."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for values, add in ((backbone, True), (head, False)):
            for key, value in values.items():
                name, what = key.rsplit(":", 1)
                module = model.get_submodule(name)
                target = linear_weight(module) if what == "weight" else module.bias
                if add:
                    target.add_(value.to(target.dtype))
                else:
                    target.copy_(value)
    return model


def collect(task: str, data: dict, base, folder: Path, saved: list[str], collate) -> dict:
    """Load the task's adapter on a copy of ``base``: its individual dev accuracy, its backbone deltas (float32) and
    its head values (the effective weights of its ``modules_to_save`` modules), and the adapter's logits on the
    first dev batch."""
    model = copy.deepcopy(base)
    dt.load(model, folder, name=task)
    acc = evaluate(model, eval_loader(data["dev"], 64, collate), "classification")["eval_accuracy"]
    backbone, head = {}, {}
    with torch.no_grad():
        for name, delta in dt.deltas(model, task).items():
            layer = model.get_submodule(name)
            w, b = linear_weight(layer.base), getattr(layer.base, "bias", None)
            dw, db = delta.dense().detach().float(), delta.dense_bias()
            if is_saved(name, saved):
                head[f"{name}:weight"] = (w.float() + dw).to(w.dtype)
                if db is not None and b is not None:
                    head[f"{name}:bias"] = (b.float() + db.detach().float()).to(b.dtype)
            else:
                backbone[f"{name}:weight"] = dw.clone()
                if db is not None:
                    backbone[f"{name}:bias"] = db.detach().float().clone()
        batch = next(iter(eval_loader(data["dev"], 64, collate)))
        model.eval()
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return {"individual": acc, "backbone": backbone, "head": head, "batch": batch, "logits": logits}


def check_composition(task: str, base, own: dict) -> None:
    """Base + own delta + own head, built the merging way, must give the adapter's logits."""
    model = build_composed(base, own["backbone"], own["head"]).eval()
    batch = own["batch"]
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    err = (logits - own["logits"]).abs().max().item()
    if err > 1e-3:
        raise RuntimeError(f"{task}: base + own delta + own head differs from the adapter by {err:.2e} in the logits")


def overlap(dense: dict[str, dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Mean and max |cosine| between the tasks' whole backbone deltas (all modules flattened together)."""
    tasks = list(dense)
    gram = torch.zeros(len(tasks), len(tasks), dtype=torch.float64)
    for key in dense[tasks[0]]:
        flat = torch.stack([dense[t][key].flatten().double() for t in tasks])
        gram += flat @ flat.t()
    norm = gram.diag().sqrt().clamp_min(1e-30)
    cos = (gram / norm[:, None] / norm[None, :]).abs()
    pairs = [cos[i, j].item() for i in range(len(tasks)) for j in range(i + 1, len(tasks))]
    return (sum(pairs) / len(pairs), max(pairs)) if pairs else (float("nan"), float("nan"))


def ratio(merged: float, individual: float) -> float:
    return merged / individual if individual else float("nan")


# -- main ------------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="lora,orthogonal,ties", help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma list of {', '.join(TASKS)}")
    lam = ap.add_mutually_exclusive_group()
    lam.add_argument("--lams", default="1.0,0.6", help="merge weights to evaluate, comma list (default 1.0,0.6)")
    lam.add_argument("--lam", type=float, help="one merge weight (same as --lams LAM)")
    ap.add_argument("--lr", type=float, help=f"peak learning rate for every method (default per method: {LR})")
    ap.add_argument("--rows", type=int, default=3000, help="training rows per task (seeded subset; 0: all)")
    ap.add_argument("--dev-rows", type=int, default=0, help="cap on dev rows per task (seeded subset; 0: all)")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--pooler", choices=("frozen", "head", "adapt"), default="frozen",
                    help="the pretrained pooler: frozen and shared (default), trained per task with the head, or "
                         "targeted by the adapter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench_modular",
                    help="adapter cache: OUT/<method>/<task>/ plus OUT/<method>/<task>.json")
    ap.add_argument("--reuse", action="store_true", help="load cached adapters trained with the same settings")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args()
    args.rows = args.rows or None
    args.dev_rows = args.dev_rows or None
    methods = [m for m in args.methods.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    lams = [args.lam] if args.lam is not None else [float(x) for x in args.lams.split(",") if x]
    for m in methods:
        if TRAINS_AS.get(m, m) not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {', '.join([*METHODS, *TRAINS_AS])}")
        method_config(TRAINS_AS.get(m, m), 0, args)  # fails now, not after an hour, if the method is missing
    for t in tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    torch.set_num_threads(args.threads)
    saved = HEAD + (POOLER if args.pooler == "head" else [])

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar for every model copy
    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    collate = Collator(tok.pad_token_id)
    data = {t: load_task(t, tok, args) for t in tasks}
    for t in tasks:
        log(f"data {t}: {len(data[t]['train'])} training rows, {len(data[t]['dev'])} dev rows, "
            f"{data[t]['num_labels']} labels, majority {data[t]['majority']:.4f}")
    bases = {n: base_model(n, args.seed) for n in {d["num_labels"] for d in data.values()}}

    results: dict[str, dict] = {}
    for m in methods:
        trained = TRAINS_AS.get(m, m)
        metas = {t: train_adapter(trained, t, data[t], tok, args, args.out / trained / t) for t in tasks}
        own = {}
        for t in tasks:
            own[t] = collect(t, data[t], bases[data[t]["num_labels"]], args.out / trained / t, saved, collate)
            check_composition(t, bases[data[t]["num_labels"]], own[t])
            log(f"{m}/{t}: individual dev accuracy {own[t]['individual']:.4f}")
        dense = {t: own[t]["backbone"] for t in tasks}
        merger = MERGERS.get(m, sum_merge)
        merged: dict[float, dict[str, float]] = {}
        for lam_ in lams:
            backbone = merger(dense, lam_)
            merged[lam_] = {}
            for t in tasks:
                model = build_composed(bases[data[t]["num_labels"]], backbone, own[t]["head"])
                merged[lam_][t] = evaluate(model, eval_loader(data[t]["dev"], 64, collate),
                                           "classification")["eval_accuracy"]
                del model
                log(f"{m}/{t}: merged (lambda {lam_:g}) dev accuracy {merged[lam_][t]:.4f} "
                    f"(retention {ratio(merged[lam_][t], own[t]['individual']):.3f})")
            del backbone
        results[m] = {"individual": {t: own[t]["individual"] for t in tasks}, "merged": merged, "metas": metas,
                      "overlap": overlap(dense) if len(tasks) > 1 else (float("nan"), float("nan"))}
        del own, dense

    # -- report ------------------------------------------------------------------------------------------------
    cols = ["task", "method", "dev rows", "majority", "individual"]
    for lam_ in lams:
        cols += [f"merged λ={lam_:g}", f"retention λ={lam_:g}"]
    rows = []
    for t in tasks + ["mean"]:
        for m in methods:
            r = results[m]
            if t == "mean":
                ind = sum(r["individual"].values()) / len(tasks)
                cells = ["**mean**", m, "", f"{sum(data[x]['majority'] for x in tasks) / len(tasks):.4f}", f"{ind:.4f}"]
            else:
                ind = r["individual"][t]
                cells = [t, m, str(len(data[t]["dev"])), f"{data[t]['majority']:.4f}", f"{ind:.4f}"]
            for lam_ in lams:
                if t == "mean":
                    acc = sum(r["merged"][lam_].values()) / len(tasks)
                    ret = sum(ratio(r["merged"][lam_][x], r["individual"][x]) for x in tasks) / len(tasks)
                else:
                    acc = r["merged"][lam_][t]
                    ret = ratio(acc, ind)
                cells += [f"{acc:.4f}", f"**{ret:.3f}**"]
            rows.append(cells)
    mrows = []
    for m in methods:
        metas = results[m]["metas"]
        lr = next(iter(metas.values()))["settings"]["lr"]
        mean_cos, max_cos = results[m]["overlap"]
        mrows.append([m, f"{lr:g}", f"{next(iter(metas.values()))['trainable']:,}",
                      f"{sum(x['time'] for x in metas.values()):.0f} s", f"{mean_cos:.4f}", f"{max_cos:.4f}"])
    sizes = ", ".join(f"{t} {len(data[t]['train'])}" for t in tasks)
    pooler = {"frozen": "pretrained pooler frozen and shared", "head": "pooler trained per task with the head",
              "adapt": "pooler targeted by the adapters"}[args.pooler]
    dev = "the full dev sets" if args.dev_rows is None else f"at most {args.dev_rows} dev rows per task"
    setup = (f"- setup: one adapter per task, trained alone: {sizes} training rows (seeded subsets), {args.epochs:g} "
             f"epoch(s), batch {args.batch}, max length {args.max_length}, AdamW, linear decay after 6 % warm-up, seed "
             f"{args.seed} + task index; targets: the 36 encoder linear layers (attention q/k/v/output, FFN in/out)"
             f"{' and the pooler' if args.pooler == 'adapt' else ''}; {pooler}; each task's head "
             f"({', '.join(saved)}) trains in full and is never merged. LoRA r=8, alpha=16; orthogonal: Orthogonal "
             "Adaptation r=8 (alpha=r), task i in slot i of one basis (seed 0), frozen A; ties: the lora adapters merged "
             "with TIES (top 20 % per task, sign election, disjoint mean) instead of the sum.")
    merged_line = ("- merged: `theta + lambda * sum_i dW_i` (ties: `theta + lambda * TIES(dW_i)`) over all tasks' backbone deltas, each task evaluated with "
                   "its own head; retention = merged / individual dev accuracy (the mean row averages the ratios). "
                   f"Dev accuracy on {dev} (majority = the majority class's share). "
                   "Trainable parameters include the head; train time is that of the run that trained the adapters.\n")
    body = [header("Modular customization: independently trained task adapters summed into one backbone (MiniLM-L6)"),
            setup, merged_line, md_table(cols, rows), "",
            md_table(["method", "lr", "trainable params per task", "train time (all tasks)",
                      "mean pairwise abs cos of task deltas", "max pairwise abs cos"], mrows)]
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        update_section("bench_modular", text)


if __name__ == "__main__":
    main()
