#!/usr/bin/env python
"""torch.compile with adapters: graph breaks, recompilations and compiled vs eager step time, deltatune vs PEFT.

Model: MiniLM-L6 (sequence classification), LoRA r=8 alpha=16 on query/key/value/dense, batch 16, sequence 128,
the same settings for ours and PEFT's (``lora_dropout=0``), both starting from the same weights.

- ``breaks``: ``torch._dynamo.explain`` of one training forward (graphs, graph breaks and their reasons) for each.
- ``recompiles``: a counting backend; attach two adapters of the same shapes, switch between them and hot-load one
  from its checkpoint, and count compilations after the first (PEFT: ``set_adapter``; its docs recommend
  ``hotswap_adapter`` for compiled models, which needs adapters of one rank and alpha).
- ``speed``: eager and ``torch.compile`` (inductor) training steps (forward, backward, AdamW step), all four variants
  in one process, warmed up (compile time reported separately), then timed in rotating rounds (DESIGN.md):
  medians and ratios.

    python benchmarks/bench_compile.py                 # breaks, recompiles, speed (inductor compiles take minutes)
    python benchmarks/bench_compile.py --what breaks recompiles --no-write
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import backward_step, header, md_table, rotating_rounds, sst2_rows, update_section, variant  # noqa: E402

import torch  # noqa: E402
import torch._dynamo as dynamo  # noqa: E402

import deltatune as dt  # noqa: E402

TARGETS = ["query", "key", "value", "dense"]


def base(seed=0):
    from transformers import AutoModelForSequenceClassification

    from deltatune.zoo import minilm_path

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, local_files_only=True)


def ours(model, name="default"):
    dt.attach(model, dt.LoRA(r=8, alpha=16, targets=TARGETS), name=name)
    return model


def peft_model(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))


def batch(args):
    from transformers import AutoTokenizer

    from deltatune.zoo import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    rows = sst2_rows("train", args.batch)
    enc = tok([t for t, _ in rows], padding="max_length", truncation=True, max_length=args.seq, return_tensors="pt")
    return dict(enc), torch.tensor([y for _, y in rows])


def breaks(args, inputs) -> list[list[str]]:
    rows = []
    for name, make in (("deltatune", lambda: ours(base())), ("peft", lambda: peft_model(base()))):
        model = make().train()
        dynamo.reset()
        e = dynamo.explain(lambda **kw: model(**kw).logits.sum())(**inputs)
        reasons = sorted({b.reason.splitlines()[0][:90] for b in e.break_reasons})
        rows.append([name, str(e.graph_count), str(e.graph_break_count), "; ".join(reasons) or "-"])
    return rows


class Counting:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def count_compilations(model, inputs, switches) -> tuple[int, int]:
    """``(graphs of the first compile, compilations after it)`` of ``model`` compiled with a counting backend,
    called once and then once after each of ``switches`` (callables that change the adapters)."""
    counter = Counting()
    dynamo.reset()
    f = torch.compile(model, backend=counter)
    with torch.no_grad():
        f(**inputs)
        first = counter.graphs
        for switch in switches:
            switch()
            f(**inputs)
    return first, counter.graphs - first


def recompiles(args, inputs) -> list[list[str]]:
    from peft import LoraConfig

    ours_model = ours(base()).eval()  # two adapters: switch, switch back, delete + dt.load (hot-load)
    ours(ours_model, "b")
    dt.set_active(ours_model, ["default"])

    def hot_load():
        with tempfile.TemporaryDirectory() as d:
            dt.save(ours_model, d, names=["b"])
            dt.delete(ours_model, "b")
            dt.load(ours_model, d)
        dt.set_active(ours_model, ["b"])

    theirs = peft_model(base()).eval()  # two adapters, set_adapter back and forth
    theirs.add_adapter("b", LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    runs = {"deltatune": (ours_model, [lambda: dt.set_active(ours_model, ["b"]),
                                        lambda: dt.set_active(ours_model, ["default"]), hot_load]),
            "peft (set_adapter)": (theirs, [lambda: theirs.set_adapter("b"), lambda: theirs.set_adapter("default")])}
    rows = []
    for name, (model, switches) in runs.items():
        first, extra = count_compilations(model, inputs, switches)
        rows.append([name, str(first), str(extra)])
    return rows


def speed(args, inputs, labels) -> tuple[list[list[str]], dict]:
    start = base()
    variants, compile_time = [], {}
    for name in ("ours-eager", "peft-eager", "ours-compiled", "peft-compiled"):
        m = copy.deepcopy(start)
        m = ours(m) if name.startswith("ours") else peft_model(m)
        v = variant(name, m, lr=1e-4)
        v.run = torch.compile(m) if name.endswith("compiled") else m
        variants.append(v)

    def step(v):
        out = v.run(**inputs, labels=labels)
        backward_step(v, out.loss)

    def warmup(v):
        t0 = time.perf_counter()
        step(v)
        compile_time[v.name] = time.perf_counter() - t0
        step(v)

    def run(v, r):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(v)
        v.times.append((time.perf_counter() - t0) / args.steps)

    dynamo.reset()
    rotating_rounds(variants, args.rounds, run, warmup=warmup)
    med = {v.name: statistics.median(v.times) for v in variants}
    rows = [[v.name, f"{med[v.name] * 1000:.0f}", f"{med[v.name] / med['ours-eager']:.2f}",
             f"{compile_time[v.name]:.0f}"] for v in variants]
    ratios = {"compiled ours / peft": med["ours-compiled"] / med["peft-compiled"],
              "eager ours / peft": med["ours-eager"] / med["peft-eager"],
              "ours compiled / eager": med["ours-compiled"] / med["ours-eager"],
              "peft compiled / eager": med["peft-compiled"] / med["peft-eager"]}
    return rows, ratios


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", nargs="+", default=["breaks", "recompiles", "speed"],
                   choices=["breaks", "recompiles", "speed"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    inputs, labels = batch(args)
    parts = [header("torch.compile (issue 19): graph breaks, recompilations, compiled step time"),
             f"- MiniLM-L6, LoRA r=8 alpha=16 on {', '.join(TARGETS)}, batch {args.batch} x {args.seq}", ""]
    if "breaks" in args.what:
        parts += ["`torch._dynamo.explain` of one training forward:", "",
                  md_table(["", "graphs", "graph breaks", "reasons"], breaks(args, inputs)), ""]
    if "recompiles" in args.what:
        parts += ["Compilations (counting backend) after the first call, while switching between two adapters of the "
                  "same shapes and back (deltatune also hot-loads one with dt.delete + dt.load):", "",
                  md_table(["", "first compile: graphs", "recompilations"], recompiles(args, inputs)), ""]
    if "speed" in args.what:
        rows, ratios = speed(args, inputs, labels)
        parts += [f"Training step (forward, backward, AdamW), {args.rounds} rotating rounds of {args.steps} steps, "
                  f"{args.threads} threads; compile time = the first step:", "",
                  md_table(["variant", "median ms/step", "vs ours eager", "first step s"], rows), "",
                  "; ".join(f"{k}: {v:.2f}" for k, v in ratios.items()), ""]
    body = "\n".join(parts)
    print(body)
    if not args.no_write:
        update_section("compile", body)


if __name__ == "__main__":
    main()
