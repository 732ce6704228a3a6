#!/usr/bin/env python
"""LoRA training-step speed, peak memory and attach time: deltatune vs PEFT vs the floor vs full fine-tuning.

Protocol (see DESIGN.md, "Benchmark protocol"):

- ``floor``: the same model with every weight frozen and a forward hook that makes the input-embedding output
  require grad, so the whole activation backward still runs (no weight gradients, no optimizer work). No
  adapter method can be faster.
- ``ours``: ``dt.attach(model, dt.LoRA(...))``; ``peft``: ``get_peft_model(model, LoraConfig(...))`` with the
  same r, alpha, targets, ``lora_dropout=0`` and the same ``modules_to_save``; ``full``: every weight trains.
- A step is forward + backward + ``AdamW.step()`` + ``zero_grad()`` (the floor has no optimizer).
- Speed: all variants live in ONE process (separate model copies, since attach/get_peft_model work in place),
  are warmed up, then timed in ``--rounds`` rounds of ``--steps`` steps each, with the order of the variants
  rotating every round. Per-step medians give the ratios ``overhead = ours / floor``, ``vs_peft = ours / peft``;
  the spread column is the interquartile range of the same ratio computed round by round.
- Memory: one fresh subprocess per variant runs ``--mem-steps`` steps and reports ``ru_maxrss`` (peak resident
  set size, which includes the model itself) and its increase over the RSS right before the first step.
- Attach time: median wall time of ``dt.attach`` vs ``get_peft_model`` (all-linear, r=16) on fresh deep copies
  of an already loaded model (load and copy time excluded), alternating the two.

Results print as markdown and replace this model's section in BENCHMARKS.md (``--no-write`` to skip).

    python benchmarks/bench_lora.py --model minilm --rounds 8 --steps 3
    python benchmarks/bench_lora.py --model smollm2 --rounds 5 --steps 2
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Variant, backward_step, header, md_table, rotating_rounds, sst2_rows, update_section,  # noqa: E402
                    variant)

import torch  # noqa: E402

import deltatune as dt  # noqa: E402

CONFIGS = {
    "minilm": dict(label="MiniLM-L6 (BERT encoder, sequence classification)", batch=16, seq=128, r=8, alpha=16,
                   targets=["query", "key", "value", "dense"], modules_to_save=["classifier"]),
    "smollm2": dict(label="SmolLM2-135M (Llama decoder, GQA, causal LM loss)", batch=4, seq=256, r=16, alpha=32,
                    targets="all-linear", modules_to_save=None),
}
VARIANTS = ("floor", "ours", "peft", "full")
#: ``fp32``; ``bf16``: the base model's weights in bfloat16, adapters in float32 (what ``dt.attach`` and PEFT's
#: ``autocast_adapter_dtype=True`` both give); ``autocast``: fp32 weights, steps under ``torch.autocast(bf16)``
PRECISIONS = ("fp32", "bf16", "autocast")
PRECISION = "fp32"


# -- models and data ---------------------------------------------------------------------------------------------
def load_base(model_name: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from deltatune.zoo import minilm_path, smollm2_path

    torch.manual_seed(0)  # the classification head is freshly initialized
    if model_name == "minilm":
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    else:
        model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    model = model.float()
    return (model.to(torch.bfloat16) if PRECISION == "bf16" else model).train()


def make_batches(model_name: str, cfg: dict, n: int = 4) -> list[dict]:
    from transformers import AutoTokenizer

    from deltatune.zoo import minilm_path, smollm2_path

    rows = sst2_rows("train", limit=4000)
    if model_name == "minilm":
        tok = AutoTokenizer.from_pretrained(minilm_path())
        batches = []
        for i in range(n):
            chunk = rows[i * cfg["batch"]:(i + 1) * cfg["batch"]]
            enc = tok([t for t, _ in chunk], padding="max_length", truncation=True, max_length=cfg["seq"],
                      return_tensors="pt")
            batches.append({**enc, "labels": torch.tensor([y for _, y in chunk])})
        return batches
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    ids = tok(" ".join(t for t, _ in rows), return_tensors="pt")["input_ids"][0]
    need = n * cfg["batch"] * cfg["seq"]
    if ids.numel() < need:
        raise RuntimeError(f"not enough tokens for {n} batches: {ids.numel()} < {need}")
    ids = ids[:need].view(n, cfg["batch"], cfg["seq"])
    return [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()} for b in ids]


def _require_grad_hook(module, inputs, output):
    return output.requires_grad_(True)


def build(name: str, base: torch.nn.Module, cfg: dict) -> Variant:
    """A fresh copy of ``base`` set up as variant ``name`` (plus its optimizer)."""
    model = copy.deepcopy(base)
    if name == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(_require_grad_hook)
    elif name == "ours":
        dt.attach(model, dt.LoRA(r=cfg["r"], alpha=cfg["alpha"], dropout=0.0, targets=cfg["targets"],
                                 modules_to_save=cfg["modules_to_save"]), name="a")
    elif name == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], lora_dropout=0.0,
                                                 target_modules=cfg["targets"],
                                                 modules_to_save=cfg["modules_to_save"]))
    elif name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
    return variant(name, model)


def train_step(v: Variant, batch: dict) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=PRECISION == "autocast"):
        loss = v.model(**batch).loss
    backward_step(v, loss)


# -- speed -----------------------------------------------------------------------------------------------------------
def time_steps(v: Variant, batches: list[dict], steps: int, first: int = 0) -> tuple[list[float], int]:
    """Wall time of each of ``steps`` training steps, and the minor page faults they caused."""
    ts = []
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(steps):
        batch = batches[(first + i) % len(batches)]
        t0 = time.perf_counter()
        train_step(v, batch)
        ts.append(time.perf_counter() - t0)
    return ts, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


def _report_round(r: int, rounds: int, vs) -> None:
    print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{v.name} {statistics.median(v.times[-1]):.3f}s"
                                                  for v in vs if v.times), file=sys.stderr, flush=True)


def bench_speed(model_name: str, cfg: dict, variants: list[str], rounds: int, steps: int, warmup: int) -> dict:
    """All variants in this process, interleaved: every round runs ``steps`` steps of each, in rotating order."""
    base = load_base(model_name)
    batches = make_batches(model_name, cfg)
    vs = [build(n, base, cfg) for n in variants]
    del base
    return run_rounds(vs, batches, rounds, steps, warmup)


def run_rounds(vs: list[Variant], batches: list[dict], rounds: int, steps: int, warmup: int) -> dict:
    """``warmup`` untimed steps of each variant, then ``rounds`` rounds of ``steps`` timed steps of each, the order
    rotating from round to round; ``{name: {"trainable", "times" (per round, per step), "faults_per_step"}}``."""
    def run(v, r):
        ts, faults = time_steps(v, batches, steps, first=r)
        v.times.append(ts)
        v.faults += faults

    rotating_rounds(vs, rounds, run, warmup=lambda v: time_steps(v, batches, warmup),
                    report=lambda r: _report_round(r, rounds, vs))
    return {v.name: {"trainable": v.trainable, "times": v.times, "faults_per_step": v.faults / (rounds * steps)}
            for v in vs}


def speed_child(model_name: str, cfg: dict, variant: str, steps: int, warmup: int, first: int) -> None:
    base = load_base(model_name)
    batches = make_batches(model_name, cfg)
    v = build(variant, base, cfg)
    del base
    gc.collect()
    time_steps(v, batches, warmup)
    ts, faults = time_steps(v, batches, steps, first=first)
    print(json.dumps({"times": ts, "faults": faults, "trainable": v.trainable}))


def bench_speed_separate(model_name: str, variants: list[str], rounds: int, steps: int, warmup: int,
                         malloc: str) -> dict:
    """Each variant alone in a fresh process per round (the processes run one after another, rotating order)."""
    res = {n: {"trainable": 0, "times": [], "faults": 0} for n in variants}
    for r in range(rounds):
        for n in variants[r % len(variants):] + variants[:r % len(variants)]:
            cmd = [sys.executable, __file__, "--model", model_name, "--speed-child", n, "--precision", PRECISION,
                   "--steps", str(steps),
                   "--warmup", str(warmup), "--first", str(r), "--malloc", malloc]
            out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            res[n]["times"].append(out["times"])
            res[n]["faults"] += out["faults"]
            res[n]["trainable"] = out["trainable"]
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {statistics.median(res[n]['times'][-1]):.3f}s"
                                                      for n in variants), file=sys.stderr, flush=True)
    for n in variants:
        res[n]["faults_per_step"] = res[n].pop("faults") / (rounds * steps)
    return res


def ratio(res: dict, num: str, den: str) -> tuple[float, float, float] | None:
    """``(ratio of per-step medians, q25, q75 of the per-round ratios)``."""
    if num not in res or den not in res:
        return None
    med = lambda rounds: statistics.median(t for ts in rounds for t in ts)  # noqa: E731
    a, b = res[num]["times"], res[den]["times"]
    per_round = sorted(statistics.mean(x) / statistics.mean(y) for x, y in zip(a, b))
    q = statistics.quantiles(per_round, n=4) if len(per_round) >= 2 else [per_round[0]] * 3
    return med(a) / med(b), q[0], q[2]


def speed_table(res: dict) -> str:
    med = {n: statistics.median(t for ts in r["times"] for t in ts) for n, r in res.items()}
    rows = []
    for n in res:
        cells = [n, f"{res[n]['trainable']:,}"]
        for den in ("floor", "peft"):
            rr = ratio(res, n, den)
            cells.append("-" if rr is None or n == den else f"**{rr[0]:.3f}** [{rr[1]:.3f}, {rr[2]:.3f}]")
        cells.append(f"({med[n]:.3f} s)")
        cells.append(f"{res[n]['faults_per_step']:,.0f}")
        rows.append(cells)
    return md_table(["variant", "trainable params", "step / floor step", "step / PEFT step",
                     "median step", "page faults / step"], rows)


# -- memory ----------------------------------------------------------------------------------------------------------
def _status_mb(field_name: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def mem_child(model_name: str, cfg: dict, variant: str, steps: int) -> None:
    base = load_base(model_name)
    batches = make_batches(model_name, cfg)
    v = build(variant, base, cfg)
    del base
    gc.collect()
    reset_peak_rss()  # so that loading and copying the model do not set the peak
    before = _status_mb("VmRSS")
    for i in range(steps):
        train_step(v, batches[i % len(batches)])
    print(json.dumps({"variant": variant, "rss_before_mb": before, "peak_mb": _status_mb("VmHWM")}))


def bench_memory(model_name: str, variants: list[str], steps: int) -> dict:
    out = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--model", model_name, "--mem-child", v, "--precision", PRECISION,
               "--mem-steps", str(steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[v] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  memory {v}: {out[v]}", file=sys.stderr, flush=True)
    return out


def memory_table(mem: dict, steps: int) -> str:
    ref = mem.get("full")
    rows = []
    for v, m in mem.items():
        inc = m["peak_mb"] - m["rss_before_mb"]
        rows.append([v, f"{m['peak_mb']:.0f} MB",
                     "-" if ref is None else f"{m['peak_mb'] / ref['peak_mb']:.2f}",
                     f"{inc:.0f} MB",
                     "-" if ref is None else f"**{inc / (ref['peak_mb'] - ref['rss_before_mb']):.2f}**"])
    return md_table(["variant", "peak RSS during training", "peak / full FT",
                     f"peak - RSS before step 1 ({steps} steps)", "increase / full FT"], rows)


# -- attach time -----------------------------------------------------------------------------------------------------
def bench_attach(repeats: int) -> dict:
    from peft import LoraConfig, get_peft_model

    base = load_base("smollm2")
    times = {"ours": [], "peft": []}
    n_layers = 0
    for i in range(repeats):
        for which in (("ours", "peft") if i % 2 == 0 else ("peft", "ours")):
            m = copy.deepcopy(base)
            gc.collect()
            torch.manual_seed(0)
            t0 = time.perf_counter()
            if which == "ours":
                dt.attach(m, dt.LoRA(r=16, alpha=32, targets="all-linear"), name="a")
                n_layers = sum(1 for _ in dt.model.adapted_layers(m))
            else:
                get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
            times[which].append(time.perf_counter() - t0)
            del m
    print(f"  attach: {times}", file=sys.stderr, flush=True)
    return {"times": times, "layers": n_layers}


def attach_table(att: dict) -> str:
    med = {k: statistics.median(v) for k, v in att["times"].items()}
    return md_table(["", "dt.attach", "peft.get_peft_model", "ours / PEFT"],
                    [[f"all-linear LoRA r=16 on SmolLM2-135M ({att['layers']} layers), median of "
                      f"{len(att['times']['ours'])}",
                      f"({med['ours'] * 1e3:.0f} ms)", f"({med['peft'] * 1e3:.0f} ms)",
                      f"**{med['ours'] / med['peft']:.2f}**"]])


# -- main ------------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=[*CONFIGS, "all"], default="minilm")
    ap.add_argument("--rounds", type=int, default=8, help="timed rounds (each runs every variant)")
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the first round")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list out of " + ",".join(VARIANTS))
    ap.add_argument("--what", default="speed,memory,attach",
                    help="comma list: speed, memory, attach (attach always uses SmolLM2)")
    ap.add_argument("--mem-steps", type=int, default=3)
    ap.add_argument("--attach-repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--malloc", choices=["default", "retain"], default="default",
                    help="glibc malloc as it comes, or deltatune.runtime.retain_freed_memory() (no heap trimming) "
                         "for the whole process, i.e. for every variant")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32",
                    help="fp32; bf16 base weights with float32 adapters; or fp32 under CPU bf16 autocast")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--processes", choices=["one", "separate"], default="one",
                    help="speed: all variants interleaved in one process (default), or each variant in a fresh "
                         "process per round")
    ap.add_argument("--mem-child", help=argparse.SUPPRESS)
    ap.add_argument("--speed-child", help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global PRECISION
    PRECISION = args.precision
    torch.set_num_threads(args.threads)
    if args.malloc == "retain":
        from deltatune.runtime import retain_freed_memory

        assert retain_freed_memory(), "retain_freed_memory() did not apply on this system"

    if args.speed_child:
        speed_child(args.model, CONFIGS[args.model], args.speed_child, args.steps, args.warmup, args.first)
        return
    if args.mem_child:
        mem_child(args.model, CONFIGS[args.model], args.mem_child, args.mem_steps)
        return

    what = set(args.what.split(","))
    variants = [v for v in args.variants.split(",") if v]
    models = list(CONFIGS) if args.model == "all" else [args.model]
    for model_name in models:
        cfg = CONFIGS[model_name]
        targets = cfg["targets"] if isinstance(cfg["targets"], str) else "/".join(cfg["targets"])
        setting = "one process" if args.processes == "one" else "separate processes"
        prec = "" if args.precision == "fp32" else f", {args.precision}"
        body = [header(f"LoRA training step: {cfg['label']}{prec}, malloc {args.malloc}, {setting}")]
        body.append(f"- setup: batch {cfg['batch']}, sequence length {cfg['seq']}, LoRA r={cfg['r']} "
                    f"alpha={cfg['alpha']} dropout=0 on {targets}"
                    + (f", modules_to_save={cfg['modules_to_save']} (both libraries)" if cfg["modules_to_save"]
                       else "") + {"fp32": ", fp32", "bf16": ", bf16 base weights with float32 adapters (both libraries)",
                       "autocast": ", fp32 weights under CPU `torch.autocast(bfloat16)`"}[args.precision] + ", train mode (model dropout on), AdamW; glibc malloc "
                    + ("as it comes" if args.malloc == "default" else
                       "with `deltatune.runtime.retain_freed_memory()` for the whole process (every variant)") + "\n")
        if "speed" in what:
            print(f"[{model_name}] speed: {args.rounds} rounds x {args.steps} steps of {variants}", file=sys.stderr)
            if args.processes == "one":
                res = bench_speed(model_name, cfg, variants, args.rounds, args.steps, args.warmup)
                where = "all variants interleaved in one process"
            else:
                res = bench_speed_separate(model_name, variants, args.rounds, args.steps, args.warmup, args.malloc)
                where = "each variant in a fresh process per round, the processes one after another"
            body.append(f"Speed: {args.rounds} rounds x {args.steps} steps per variant after "
                        f"{args.warmup} warm-up steps, {where}. Ratio of per-step medians in bold, "
                        "[q25, q75] of the per-round ratios in brackets, absolute median step time in parentheses "
                        "(noise on this shared machine; read the ratios).\n")
            body.append(speed_table(res) + "\n")
        if "memory" in what:
            mem_variants = [v for v in ("full", "ours", "peft", "floor") if v in variants]
            print(f"[{model_name}] memory: {mem_variants}", file=sys.stderr)
            mem = bench_memory(model_name, mem_variants, args.mem_steps)
            body.append(f"Memory: one fresh subprocess per variant, {args.mem_steps} training steps; the peak "
                        "resident size (VmHWM) is reset right before the first step, so it is the training peak "
                        "(it includes the Python runtime and the model weights); the increase column subtracts the "
                        "RSS right before the first step: activations, gradients, optimizer state, allocator "
                        "slack.\n")
            body.append(memory_table(mem, args.mem_steps) + "\n")
        if "attach" in what and model_name == "smollm2":
            print("[smollm2] attach time", file=sys.stderr)
            att = bench_attach(args.attach_repeats)
            body.append("Attach time: fresh `copy.deepcopy` of the loaded model for every call (load and copy "
                        "excluded), the two libraries alternating.\n")
            body.append(attach_table(att) + "\n")
        text = "\n".join(body)
        print(text)
        if not args.no_write:
            update_section(f"bench_lora:{model_name}:{args.malloc}:{args.processes}"
                           + ("" if args.precision == "fp32" else f":{args.precision}"), text)


if __name__ == "__main__":
    main()
