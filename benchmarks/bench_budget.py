#!/usr/bin/env python
"""Adaptive rank budgets (AdaLoRA, IncreLoRA, SoRA): step time over a full schedule, peak memory, quality.

Setting (issue 3): MiniLM-L6, batch 16, sequence length 128, targets query/key/value/dense (37 matrices: the
suffix ``dense`` also matches the intermediate, output and pooler layers), classifier head trained in full, AdamW,
fp32.

- ``lora``: ``dt.LoRA(r=8, alpha=16)``, the reference every ratio divides by; ``lora12``: the same at r=12.
- ``adalora``: ``dt.AdaLoRA(init_r=12, target_r=8)``, shrunk physically at ``T - t_final`` (default);
  ``adalora_each``: ``shrink="each"`` (pruned triplets removed at every masking event);
  ``adalora_never``: ``shrink="never"`` (all 12 kept, masked, as the reference does).
- ``increlora``: ``dt.IncreLoRA(init_r=4, target_r=8, top_h=4)`` (growth spread over the first half);
- ``sora``: ``dt.SoRA(r=8)``;
- ``peft_adalora``: PEFT ``AdaLoraConfig`` with the same ranks and schedule, ``update_and_allocate`` every step.

Speed: every variant runs its own *full schedule* of ``T`` optimizer steps (``t_init = T/6``, ``t_final = T/3``,
``delta_t = 2``: the official SQuAD proportions 50 / 100 of 300 with a denser masking), all variants in one process,
interleaved one step at a time (rotating order each round), so slow phases of the machine hit everyone. A step is
forward + backward + ``AdamW.step()`` + the controller (``dt.step`` or ``update_and_allocate``) + ``zero_grad()``.
The schedule time of a variant is estimated per third of the schedule (warm-up, budgeting, final pattern, roughly)
as the median step time of that third times its length, so one stray slow step (this machine is shared) does not
decide the result; the ratio divides by LoRA r8's estimate. The per-third ratios and the ratio of raw sums are
printed next to it.

Memory: one fresh subprocess per variant runs ``--mem-steps`` steps of its schedule (compressed to that length) and
reports the peak resident set size (VmHWM reset before step 1) minus the RSS before step 1.

Quality: SST-2 (first 4,000 training rows, 1 epoch, max length 64, batch 32) and RTE (all 2,490 rows, 2 epochs,
max length 128, batch 16), dev accuracy, same seed, data order and steps for every method, each at its best
learning rate from a short sweep on held-out SST-2 training rows (``--what sweep``); the final number of trainable
adapter parameters is reported next to it.

    python benchmarks/bench_budget.py --what speed --repeats 2     # about 20 minutes on 2 cores
    python benchmarks/bench_budget.py --what memory                # about 7 minutes
    python benchmarks/bench_budget.py --what sweep                 # about 8 minutes
    python benchmarks/bench_budget.py --what quality               # about 30 minutes
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import _status_mb, load_base, make_batches, reset_peak_rss  # noqa: E402
from common import DATA, header, md_table, memory_children, update_section  # noqa: E402

import torch  # noqa: E402

import deltatune as dt  # noqa: E402

TARGETS = ["query", "key", "value", "dense"]
CFG = dict(batch=16, seq=128)
SPEED_VARIANTS = ("lora", "lora12", "adalora", "adalora_each", "adalora_never", "increlora", "sora", "peft_adalora")
QUALITY_VARIANTS = ("lora", "adalora", "increlora", "sora")
#: per-method learning rates, the best of ``--what sweep`` (SST-2 rows held out from training, not the dev set)
QUALITY_LR = {"lora": 3e-3, "adalora": 3e-2, "increlora": 3e-2, "sora": 3e-3}
SWEEP_LRS = (1e-3, 3e-3, 1e-2, 3e-2)


def schedule(total: int) -> dict:
    return dict(t_init=total // 6, t_final=total // 3, delta_t=2)


def method(variant: str, total: int):
    """The deltatune method of ``variant`` for a ``total``-step schedule (None for PEFT)."""
    common = dict(targets=TARGETS, modules_to_save=["classifier"])
    sched = schedule(total)
    if variant == "lora":
        return dt.LoRA(r=8, alpha=16, **common)
    if variant == "lora12":
        return dt.LoRA(r=12, alpha=24, **common)
    if variant.startswith("adalora"):
        shrink = {"adalora": "final", "adalora_each": "each", "adalora_never": "never"}[variant]
        return dt.AdaLoRA(init_r=12, target_r=8, alpha=16, total_step=total, shrink=shrink, **sched, **common)
    if variant == "increlora":
        return dt.IncreLoRA(init_r=4, target_r=8, alpha=16, top_h=4, total_step=total, **common)
    if variant == "sora":
        return dt.SoRA(r=8, alpha=16, total_step=total, **common)
    return None


class Runner:
    """One variant: its model, optimizer and position in its schedule."""

    def __init__(self, variant: str, base, total: int):
        self.name, self.total, self.t = variant, total, 0
        model = copy.deepcopy(base)
        if variant == "peft_adalora":
            from peft import AdaLoraConfig, get_peft_model

            sched = schedule(total)
            model = get_peft_model(model, AdaLoraConfig(
                init_r=12, target_r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                modules_to_save=["classifier"], total_step=total, tinit=sched["t_init"], tfinal=sched["t_final"],
                deltaT=sched["delta_t"]))
            self.peft = True
        else:
            dt.attach(model, method(variant, total))
            dt.begin(model, total)
            self.peft = False
        self.model = model.train()
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.times: list[float] = []

    def step(self, batch: dict) -> None:
        t0 = time.perf_counter()
        self.model(**batch).loss.backward()
        self.opt.step()
        if self.peft:
            self.model.base_model.update_and_allocate(self.t)
        else:
            dt.step(self.model, self.opt)
        self.opt.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - t0)
        self.t += 1

    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def bench_speed(variants: list[str], total: int, warmup: int) -> dict:
    base = load_base("minilm")
    batches = make_batches("minilm", CFG)
    runners = [Runner(v, base, total) for v in variants]
    del base
    gc.collect()
    with torch.no_grad():  # warm-up forwards (no step: the schedules start untouched)
        for r in runners:
            for i in range(warmup):
                r.model(**batches[i % len(batches)])
    for t in range(total):
        k = t % len(runners)
        for r in runners[k:] + runners[:k]:
            r.step(batches[t % len(batches)])
        if (t + 1) % 10 == 0:
            print(f"  step {t + 1}/{total}: " + ", ".join(f"{r.name} {r.times[-1]:.3f}s" for r in runners),
                  file=sys.stderr, flush=True)
    return {r.name: {"times": r.times, "trainable_end": r.trainable()} for r in runners}


def pool(runs: list[dict]) -> dict:
    """Several repetitions of :func:`bench_speed` as one: per step index, the median over repetitions."""
    return {name: {"times": [statistics.median(ts) for ts in zip(*(r[name]["times"] for r in runs))],
                   "trainable_end": runs[-1][name]["trainable_end"]} for name in runs[0]}


def phase_estimate(times: list[float]) -> list[float]:
    """Per third of the schedule: median step time x number of steps (robust to a stray slow step)."""
    n = len(times)
    cuts = [0, n // 3, 2 * n // 3, n]
    return [statistics.median(times[a:b]) * (b - a) for a, b in zip(cuts, cuts[1:])]


def speed_table(res: dict) -> str:
    ref = phase_estimate(res["lora"]["times"])
    rows = []
    for name, r in res.items():
        est = phase_estimate(r["times"])
        thirds = ", ".join(f"{e / f:.3f}" for e, f in zip(est, ref))
        rows.append([name, f"{r['trainable_end']:,}", f"**{sum(est) / sum(ref):.3f}**", f"[{thirds}]",
                     f"{sum(r['times']) / sum(res['lora']['times']):.3f}", f"({statistics.median(r['times']):.3f} s)"])
    return md_table(["variant", "trainable params at the end", "schedule time / LoRA r8",
                     "[per third of the schedule]", "raw sum ratio", "median step"], rows)


# -- memory ----------------------------------------------------------------------------------------------------------
def mem_child(variant: str, steps: int) -> None:
    base = load_base("minilm")
    batches = make_batches("minilm", CFG)
    r = Runner(variant, base, steps)
    del base
    gc.collect()
    reset_peak_rss()
    before = _status_mb("VmRSS")
    for i in range(steps):
        r.step(batches[i % len(batches)])
    print(json.dumps({"rss_before_mb": before, "peak_mb": _status_mb("VmHWM")}))


def bench_memory(variants: list[str], steps: int) -> dict:
    return memory_children(__file__, variants, steps)


def memory_table(mem: dict) -> str:
    inc = {v: m["peak_mb"] - m["rss_before_mb"] for v, m in mem.items()}
    return md_table(["variant", "peak RSS", "peak - RSS before step 1", "increase / LoRA r8"],
                    [[v, f"{m['peak_mb']:.0f} MB", f"{inc[v]:.0f} MB", f"**{inc[v] / inc['lora']:.2f}**"]
                     for v, m in mem.items()])


# -- quality -----------------------------------------------------------------------------------------------------------
TASKS = {
    "sst2": dict(folder="SST-2", text="sentence", pair=None, rows=4000, epochs=1, batch=32, max_length=64),
    "rte": dict(folder="RTE", text="sentence1", pair="sentence2", rows=None, epochs=2, batch=16, max_length=128),
}


def bench_quality(variants: list[str], tasks: list[str], seed: int) -> list[list[str]]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune.train import Collator, TrainArgs, encode_classification, read_rows, set_seed, train
    from deltatune.zoo import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    rows = []
    for task in tasks:
        cfg = TASKS[task]
        folder = DATA / "glue" / cfg["folder"]
        train_ex, label2id = encode_classification(read_rows(folder / "train.tsv", cfg["rows"]), tok, cfg["text"],
                                                   "label", cfg["pair"], max_length=cfg["max_length"])
        dev_ex, _ = encode_classification(read_rows(folder / "dev.tsv"), tok, cfg["text"], "label", cfg["pair"],
                                          max_length=cfg["max_length"], label2id=label2id)
        total = cfg["epochs"] * -(-len(train_ex) // cfg["batch"])
        for variant in variants:
            set_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=len(label2id),
                                                                       local_files_only=True)
            dt.attach(model, method(variant, total))
            args = TrainArgs(lr=QUALITY_LR[variant], batch_size=cfg["batch"], epochs=cfg["epochs"], warmup_ratio=0.06,
                             seed=seed, save_adapter=False, plot=False)
            start = time.perf_counter()
            result = train(model, train_ex, args, eval_data=dev_ex, collate_fn=Collator(tok.pad_token_id))
            secs = time.perf_counter() - start
            adapter = sum(p.numel() for d in dt.deltas(model, "default").values()
                          if not isinstance(d, dt.FullDelta) for p in d.parameters())
            acc = result["eval"]["eval_accuracy"]
            print(f"{task} {variant}: accuracy {acc:.4f}, {adapter:,} adapter params ({secs:.0f} s)", file=sys.stderr,
                  flush=True)
            rank = dt.controller_metrics(model).get("rank")
            rows.append([task, variant, f"{QUALITY_LR[variant]:g}", f"{adapter:,}", "-" if rank is None else str(rank),
                         str(result["steps"]),
                         f"**{acc:.4f}**", f"{result['eval']['eval_loss']:.4f}", f"({secs:.0f} s)"])
            del model
    return rows


def bench_sweep(variants: list[str], seed: int) -> list[list[str]]:
    """Learning-rate sweep: 32 steps on the first 1,024 SST-2 training rows, accuracy on training rows
    5,000-5,399 (held out from every run; the dev set is never used for choosing)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune.train import Collator, TrainArgs, encode_classification, read_rows, set_seed, train
    from deltatune.zoo import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    rows = read_rows(DATA / "glue" / "SST-2" / "train.tsv", 5400)
    train_ex, label2id = encode_classification(rows[:1024], tok, "sentence", "label", max_length=64)
    held, _ = encode_classification(rows[5000:5400], tok, "sentence", "label", max_length=64, label2id=label2id)
    table = []
    for variant in variants:
        accs = []
        for lr in SWEEP_LRS:
            set_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2,
                                                                       local_files_only=True)
            dt.attach(model, method(variant, 32))
            result = train(model, train_ex, TrainArgs(lr=lr, batch_size=32, epochs=1, warmup_ratio=0.06, seed=seed,
                                                      save_adapter=False, plot=False, progress=False),
                           eval_data=held, collate_fn=Collator(tok.pad_token_id))
            accs.append(result["eval"]["eval_accuracy"])
            print(f"sweep {variant} lr {lr:g}: {accs[-1]:.4f}", file=sys.stderr, flush=True)
        best = max(accs)
        table.append([variant, *(f"**{a:.3f}**" if a == best else f"{a:.3f}" for a in accs)])
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", default="speed,memory", help="comma list: speed, memory, sweep, quality")
    ap.add_argument("--variants", default=None, help="comma list (default: all of the part)")
    ap.add_argument("--steps", type=int, default=60, help="schedule length T for the speed run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="independent repetitions of the speed run")
    ap.add_argument("--mem-steps", type=int, default=12)
    ap.add_argument("--tasks", default="sst2,rte")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--mem-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from deltatune.runtime import retain_freed_memory

    retain_freed_memory()  # as deltatune's trainer does while it trains: no page-fault noise between variants
    if args.mem_child:
        mem_child(args.mem_child, args.mem_steps)
        return
    what = set(args.what.split(","))
    if what & {"speed", "memory"}:
        variants = args.variants.split(",") if args.variants else list(SPEED_VARIANTS)
        sched = schedule(args.steps)
        setup = (f"- setup: batch {CFG['batch']}, sequence length {CFG['seq']}, targets query/key/value/dense "
                 "(37 matrices: every `dense` matches, the pooler's too), classifier trained in full, fp32, train "
                 "mode, AdamW, glibc malloc with `deltatune.runtime.retain_freed_memory()`; AdaLoRA init_r 12 -> "
                 f"target_r 8, alpha 16, T = {args.steps}, t_init = {sched['t_init']}, t_final = {sched['t_final']}, "
                 f"delta_t = {sched['delta_t']}, orthogonal regularizer 0.5 (ours and PEFT); IncreLoRA 4 -> 8 "
                 "(top_h 4, growth over the first half); SoRA r 8.\n")
    if "speed" in what:
        runs = [bench_speed(variants, args.steps, args.warmup) for _ in range(args.repeats)]
        body = [header("Adaptive budgets: step time over a full schedule (MiniLM-L6)"), setup,
                f"Speed: each variant runs its full {args.steps}-step schedule, all interleaved one step at a time in "
                f"one process; {args.repeats} independent repetition(s) with fresh models, times pooled per step "
                "index. Schedule time = sum over the three thirds of the schedule of (median step time in that "
                "third x its steps); its ratio to LoRA r8's in bold, the ratio per third in brackets, the ratio of "
                "raw time sums after it.\n",
                speed_table(pool(runs)) + "\n"]
        text = "\n".join(body)
        print(text)
        if not args.no_write:
            update_section("bench_budget:speed", text)
    if "memory" in what:
        mem = bench_memory([v for v in variants if v != "lora12"], args.mem_steps)
        body = [header("Adaptive budgets: training memory (MiniLM-L6)"), setup,
                f"Memory: one fresh subprocess per variant, the schedule compressed to {args.mem_steps} steps "
                f"(t_init {schedule(args.mem_steps)['t_init']}, t_final {schedule(args.mem_steps)['t_final']}, "
                "delta_t 2); peak RSS (VmHWM reset before step 1) minus the RSS before step 1.\n",
                memory_table(mem) + "\n"]
        text = "\n".join(body)
        print(text)
        if not args.no_write:
            update_section("bench_budget:memory", text)
    if "sweep" in what:
        variants = args.variants.split(",") if args.variants else list(QUALITY_VARIANTS)
        table = bench_sweep(variants, args.seed)
        text = "\n".join([
            header("Adaptive budgets: learning-rate sweep (MiniLM-L6, SST-2)"),
            "- setup: 32 steps (batch 32, length 64) on the first 1,024 SST-2 training rows, accuracy on training "
            "rows 5,000-5,399 (held out; the dev set is not used for choosing), same targets and ranks as the "
            "quality runs, linear decay after 6 % warm-up. The best rate of each method (bold) is the one the quality "
            "runs use: AdaLoRA's and IncreLoRA's triplets start at `lam = 0` with `P, Q ~ N(0, 0.02^2)`, so their "
            "update grows far more slowly than LoRA's at the same rate.\n",
            md_table(["method", *(f"lr {lr:g}" for lr in SWEEP_LRS)], table)])
        print(text)
        if not args.no_write:
            update_section("bench_budget:sweep", text)
    if "quality" in what:
        variants = args.variants.split(",") if args.variants else list(QUALITY_VARIANTS)
        rows = bench_quality(variants, args.tasks.split(","), args.seed)
        text = "\n".join([
            header("Adaptive budgets: quality at an equal final budget (MiniLM-L6)"),
            "- setup: query/key/value/dense, classifier trained in full, each method at its best learning rate of "
            "the sweep below, AdamW, linear decay after 6 % warm-up, seed "
            f"{args.seed}, same data order. LoRA r 8; AdaLoRA 12 -> 8 (T/6, T/3, delta_t 2); IncreLoRA 4 -> 8; "
            "SoRA r_max 8 (threshold 3e-4). SST-2: first 4,000 training rows, 1 epoch, batch 32, length 64. "
            "RTE: 2,490 rows, 2 epochs, batch 16, length 128. Adapter params exclude the classifier head.\n",
            md_table(["task", "method", "lr", "adapter params at the end", "final total rank", "steps",
                      "dev accuracy", "dev loss", "train time"], rows)])
        print(text)
        if not args.no_write:
            update_section("bench_budget:quality", text)


if __name__ == "__main__":
    main()
