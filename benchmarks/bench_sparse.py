#!/usr/bin/env python
"""Sparse fine-tuning on SmolLM2-135M: S2FT and SpIEL vs our LoRA vs PEFT LoRA vs full fine-tuning vs the floor.

Same protocol as ``bench_lora.py`` (floor, interleaved rounds in one process for speed, one fresh process per
variant for peak RSS). Batch 4, sequence 256, causal-LM loss on SST-2 text. Every method trains as many parameters
as LoRA r=16 on all linear layers (4,884,480):

- ``s2ft``: half of them on attention-output columns (``o``: whole query heads), half on FFN ``down`` columns
  (channels), random global selection: the paper's LLaMA2 recipe (``o`` and ``d`` only), both column type, so
  partial back-propagation saves only the selected input channels;
- ``spiel``: ``num_params`` entries over all linear layers, prune/regrow every 20 steps after 5 steps of gradient
  watching (the paper's defaults), so the timed steps cover the whole cycle; ``dt.step`` runs after every step.

    python benchmarks/bench_sparse.py --what speed --rounds 5 --steps 4
    python benchmarks/bench_sparse.py --what memory
    python benchmarks/bench_sparse.py --what sweep
    python benchmarks/bench_sparse.py --what quality

Quality: the same seed, data order and number of steps for every method, each at a fixed learning rate
(``QUALITY_LR``: the usual order of magnitude for each kind of update, *not* tuned here; ``--what sweep`` runs a
sweep on GSM8K training questions held out from training, about an hour on 2 cores):

- GSM8K: ``QUALITY_STEPS`` steps of batch 4 on the training set (``Question: ...\nAnswer: `` prompt, loss on
  the answer, at most 256 tokens), then the mean per-token loss on the answers of the first 200 test questions;
- BoolQ (LLM-Adapters' commonsense format: the question without the passage): the same number of steps on its
  training set, then accuracy on the first 500 test questions, choosing whichever of "the correct answer is
  true / false" has the lower loss (the base model is scored the same way);
- SST-2 on MiniLM (encoder): one epoch over the first 4,000 training rows, dev accuracy, attention + FFN targets
  (``S2FT`` with v/o/u/d, ``SpIEL`` at LoRA r=8's parameter count).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lora as BL  # noqa: E402
from common import header, md_table, memory_children, update_section  # noqa: E402

import torch  # noqa: E402

import deltatune as dt  # noqa: E402

CFG = dict(BL.CONFIGS["smollm2"])
VARIANTS = ("floor", "lora", "peft", "full", "s2ft", "spiel")
LORA_R16 = 4_884_480  # LoRA r=16, all-linear, SmolLM2-135M


def s2ft_method(base) -> dt.S2FT:
    """Half of the LoRA r=16 budget on ``o`` heads, half on ``down`` channels."""
    from deltatune.targets import find_blocks

    b = find_blocks(base)[0]
    L = len(find_blocks(base))
    o_pool = L * b.heads * b.head_dim * base.config.hidden_size
    d_pool = L * b.channels * base.config.hidden_size
    return dt.S2FT(o_ratio=LORA_R16 / 2 / o_pool, d_ratio=LORA_R16 / 2 / d_pool)


def attach_variant(model, variant: str):
    """``model`` set up as ``variant``: a deltatune method attached, every weight trainable (``full``) or nothing
    (``base``, for evaluation)."""
    if variant == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif variant == "lora":
        dt.attach(model, dt.LoRA(r=CFG["r"], alpha=CFG["alpha"], targets=CFG["targets"]))
    elif variant == "s2ft":
        dt.attach(model, s2ft_method(model))
    elif variant == "spiel":
        dt.attach(model, dt.SpIEL(num_params=LORA_R16))
    elif variant != "base":
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    return model


def build(name: str, base) -> BL.Variant:
    if name in ("floor", "peft", "full"):
        v = BL.build(name, base, CFG)
        v.name = name
        return v
    import copy

    model = attach_variant(copy.deepcopy(base), name)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return BL.Variant(name, model, torch.optim.AdamW(params, lr=1e-4), sum(p.numel() for p in params))


def train_step(v: BL.Variant, batch: dict) -> None:
    v.model(**batch).loss.backward()
    if v.opt is not None:
        v.opt.step()
        if v.name in ("lora", "s2ft", "spiel"):
            dt.step(v.model, v.opt)
        v.opt.zero_grad(set_to_none=True)


BL.train_step = train_step  # bench_lora's timing and memory loops call this


def bench_speed(variants: list[str], rounds: int, steps: int, warmup: int) -> dict:
    base = BL.load_base("smollm2")
    batches = BL.make_batches("smollm2", CFG)
    vs = [build(n, base) for n in variants]
    del base
    return BL.run_rounds(vs, batches, rounds, steps, warmup)


def speed_table(res: dict) -> str:
    mean = {n: statistics.mean(t for ts in r["times"] for t in ts) for n, r in res.items()}
    rows = []
    for n in res:
        cells = [n, f"{res[n]['trainable']:,}"]
        for den in ("floor", "lora", "full"):
            rr = BL.ratio(res, n, den)
            cells.append("-" if rr is None or n == den else f"**{rr[0]:.3f}** [{rr[1]:.3f}, {rr[2]:.3f}]")
        cells.append(f"{mean[n] / mean['lora']:.3f}" if "lora" in mean else "-")
        rows.append(cells)
    return md_table(["variant", "trainable params", "step / floor", "step / our LoRA", "step / full FT",
                     "mean step / our LoRA"], rows)


def mem_child(variant: str, steps: int) -> None:
    base = BL.load_base("smollm2")
    batches = BL.make_batches("smollm2", CFG)
    v = build(variant, base)
    del base
    gc.collect()
    BL.reset_peak_rss()
    before = BL._status_mb("VmRSS")
    for i in range(steps):
        train_step(v, batches[i % len(batches)])
    print(json.dumps({"variant": variant, "rss_before_mb": before, "peak_mb": BL._status_mb("VmHWM")}))


def bench_memory(variants: list[str], steps: int) -> dict:
    return memory_children(__file__, variants, steps)


def memory_table(mem: dict) -> str:
    floor = mem.get("floor")
    lora = mem.get("lora")
    rows = []
    for v, m in mem.items():
        above = None if floor is None else m["peak_mb"] - floor["peak_mb"]
        lora_above = None if floor is None or lora is None else lora["peak_mb"] - floor["peak_mb"]
        rows.append([v, f"{m['peak_mb']:.0f} MB", "-" if lora is None else f"{m['peak_mb'] / lora['peak_mb']:.2f}",
                     "-" if above is None else f"{above:.0f} MB",
                     "-" if above is None or not lora_above else f"**{above / lora_above:.2f}**"])
    return md_table(["variant", "peak RSS", "peak / our LoRA", "above the floor", "above floor / our LoRA's"], rows)


# -- quality ------------------------------------------------------------------------------------------------------------
QUALITY_VARIANTS = ("lora", "s2ft", "spiel", "full")
SWEEP_LRS = {"lora": (3e-4, 1e-3, 3e-3), "s2ft": (1e-4, 3e-4, 1e-3), "spiel": (1e-4, 3e-4, 1e-3),
             "full": (1e-5, 3e-5, 1e-4)}
#: fixed, not tuned: LoRA's usual rate for r=16, full fine-tuning's for a small model, and in between for the sparse
#: methods, which update weight entries directly as full fine-tuning does but far fewer of them
QUALITY_LR = {"lora": 1e-3, "s2ft": 3e-4, "spiel": 3e-4, "full": 3e-5}
QUALITY_STEPS = 40
GSM_PROMPT = "Question: {question}\nAnswer: "


def _read_json(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


def _smollm_variant(variant: str):
    """A fresh SmolLM2 set up as ``variant``."""
    return attach_variant(BL.load_base("smollm2"), variant)


def _lm_data(task: str, tok, split: str, rows: slice) -> list[dict]:
    from deltatune.train import encode_instruction

    from common import DATA

    if task == "gsm8k":
        data = _read_json(DATA / "gsm8k" / f"{split}.jsonl")[rows]
        return [encode_instruction(GSM_PROMPT.format(**r), r["answer"], tok, 256) for r in data]
    data = _read_json(DATA / "commonsense" / "boolq" / f"{split}.json")[rows]
    return [encode_instruction(r["instruction"] + "\n", r["output"], tok, 160) for r in data]


def _mean_loss(model, examples: list[dict], collate, batch: int = 16) -> list[float]:
    """Mean next-token loss over the label tokens of each example."""
    import torch.nn.functional as F

    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            b = collate(examples[i:i + batch])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            labels = b["labels"][:, 1:]
            nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            out += ((nll * (labels != -100)).sum(1) / (labels != -100).sum(1)).tolist()
    return out


def _boolq_accuracy(model, tok, collate, n: int = 500) -> float:
    from deltatune.train import encode_instruction

    from common import DATA

    rows = _read_json(DATA / "commonsense" / "boolq" / "test.json")[:n]
    cands = [encode_instruction(r["instruction"] + "\n", f"the correct answer is {a}", tok, 160)
             for r in rows for a in ("true", "false")]
    losses = _mean_loss(model, cands, collate, batch=32)
    picks = ["true" if losses[2 * i] <= losses[2 * i + 1] else "false" for i in range(len(rows))]
    return sum(p == r["answer"] for p, r in zip(picks, rows)) / len(rows)


def _fit(variant: str, lr: float, train_ex: list[dict], collate, seed: int, steps: int, batch: int = 8):
    from deltatune.train import TrainArgs, set_seed, train

    set_seed(seed)
    model = _smollm_variant(variant)
    args = TrainArgs(lr=lr, batch_size=batch, max_steps=steps, warmup_ratio=0.1, seed=seed, save_adapter=False,
                     plot=False, progress=False, max_grad_norm=1.0)
    result = train(model, train_ex, args, task="causal_lm", collate_fn=collate)
    return model, result


def bench_sweep(variants: list[str], seed: int, steps: int) -> list[list[str]]:
    from transformers import AutoTokenizer

    from deltatune.train import Collator, pad_id_of
    from deltatune.zoo import smollm2_path

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    collate = Collator(pad_id_of(tok))
    train_ex = _lm_data("gsm8k", tok, "train", slice(0, 8 * steps))
    held = _lm_data("gsm8k", tok, "train", slice(7000, 7100))
    table = []
    for variant in variants:
        losses = []
        for lr in SWEEP_LRS[variant]:
            model, _ = _fit(variant, lr, train_ex, collate, seed, steps)
            losses.append(statistics.mean(_mean_loss(model, held, collate)))
            print(f"sweep {variant} lr {lr:g}: held-out loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
            del model
            gc.collect()
        best = min(losses)
        table.append([variant, *(f"{lr:g}: **{x:.4f}**" if x == best else f"{lr:g}: {x:.4f}"
                                 for lr, x in zip(SWEEP_LRS[variant], losses))])
    return table


def bench_quality(variants: list[str], seed: int, steps: int) -> list[list[str]]:
    import time

    from transformers import AutoTokenizer

    from deltatune.train import Collator, pad_id_of
    from deltatune.zoo import smollm2_path

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    collate = Collator(pad_id_of(tok))
    gsm_train = _lm_data("gsm8k", tok, "train", slice(0, 4 * steps))
    gsm_test = _lm_data("gsm8k", tok, "test", slice(0, 200))
    boolq_train = _lm_data("boolq", tok, "train", slice(0, 8 * steps))
    rows = []
    base = _smollm_variant("base")
    rows.append(["base (no training)", "-", "-", f"{statistics.mean(_mean_loss(base, gsm_test, collate)):.4f}",
                 f"{_boolq_accuracy(base, tok, collate):.3f}", "-"])
    del base
    for variant in variants:
        start = time.perf_counter()
        model, _ = _fit(variant, QUALITY_LR[variant], gsm_train, collate, seed, steps, batch=4)
        gsm = statistics.mean(_mean_loss(model, gsm_test, collate))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        del model
        model, _ = _fit(variant, QUALITY_LR[variant], boolq_train, collate, seed, steps)
        acc = _boolq_accuracy(model, tok, collate)
        secs = time.perf_counter() - start
        print(f"{variant}: gsm8k loss {gsm:.4f}, boolq {acc:.3f} ({secs:.0f} s)", file=sys.stderr, flush=True)
        rows.append([variant, f"{QUALITY_LR[variant]:g}", f"{trainable:,}", f"**{gsm:.4f}**", f"**{acc:.3f}**",
                     f"({secs:.0f} s)"])
        del model
        gc.collect()
    return rows


def bench_sst2(seed: int) -> list[list[str]]:
    """MiniLM on SST-2: the budget benchmark's setting, with S2FT and SpIEL at LoRA r=8's parameter count."""
    import bench_budget as BB

    lora8 = 8 * sum(o + i for o, i in _minilm_shapes())
    BB.QUALITY_LR.update(s2ft=1e-3, spiel=1e-3)
    original = BB.method

    def method(variant, total):
        common = dict(modules_to_save=["classifier"])
        if variant == "s2ft":
            return dt.S2FT(ratio=_minilm_ratio(lora8), **common)
        if variant == "spiel":
            return dt.SpIEL(num_params=lora8, targets=BB.TARGETS, **common)
        return original(variant, total)
    BB.method = method
    return BB.bench_quality(["lora", "s2ft", "spiel"], ["sst2"], seed)


def _minilm_shapes():
    from transformers import AutoModelForSequenceClassification

    from deltatune.targets import resolve_targets
    from deltatune.zoo import minilm_path

    m = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    return [tuple(m.get_submodule(n).weight.shape) for n in resolve_targets(m, ["query", "key", "value", "dense"])]


def _minilm_ratio(params: int) -> float:
    """The single S2FT ratio (v, o, u, d) that trains about ``params`` parameters on MiniLM (6 blocks, d=384,
    12 heads of 32, 1536 channels): every unit of every part has 384 x width parameters."""
    pool = 6 * 384 * (384 + 384 + 1536 + 1536)
    return params / pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", choices=("speed", "memory", "sweep", "quality", "sst2"), default="speed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quality-steps", type=int, default=QUALITY_STEPS)
    ap.add_argument("--sweep-steps", type=int, default=16)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mem-steps", type=int, default=3)
    ap.add_argument("--mem-child", help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.mem_child:
        mem_child(args.mem_child, args.mem_steps)
        return
    variants = args.variants.split(",")
    title = f"SmolLM2-135M, batch {CFG['batch']}, sequence {CFG['seq']}, {LORA_R16:,} trainable parameters"
    if args.what == "sweep":
        table = bench_sweep(args.variants.split(",") if args.variants != ",".join(VARIANTS) else
                            list(QUALITY_VARIANTS), args.seed, args.sweep_steps)
        body = (header("Sparse fine-tuning learning-rate sweep (SmolLM2-135M, GSM8K)") +
                f"- {args.sweep_steps} steps of batch 8 on GSM8K training questions, mean answer-token loss on "
                "training questions 7,000-7,099 (held out); best per method in bold\n\n" +
                md_table(["method", "lr: loss", "lr: loss", "lr: loss"], table))
        print(body)
        if not args.no_write:
            update_section("bench_sparse:sweep", body)
        return
    if args.what == "quality":
        rows = bench_quality(list(QUALITY_VARIANTS), args.seed, args.quality_steps)
        body = (header("Sparse fine-tuning quality (SmolLM2-135M: GSM8K, BoolQ)") +
                f"- {args.quality_steps} steps (GSM8K batch 4, BoolQ batch 8), warm-up 10 %, linear decay, seed "
                f"{args.seed}, same data order for every method, fixed learning rates (not tuned); GSM8K: mean "
                "answer-token loss on the first 200 test questions (lower is better); BoolQ: accuracy on the first "
                "500 test questions\n\n" +
                md_table(["method", "lr", "trainable params", "GSM8K test loss", "BoolQ accuracy", "time"], rows))
        print(body)
        if not args.no_write:
            update_section("bench_sparse:quality", body)
        return
    if args.what == "sst2":
        rows = bench_sst2(args.seed)
        body = (header("Sparse fine-tuning on an encoder (MiniLM, SST-2)") +
                "- the setting of `bench_budget.py --what quality` (first 4,000 training rows, 1 epoch, batch 32, "
                "max length 64, classifier trained in full); S2FT with one ratio for v/o/u/d and SpIEL both at LoRA "
                "r=8's adapter parameter count\n\n" +
                md_table(["task", "method", "lr", "adapter params", "rank", "steps", "dev accuracy", "dev loss",
                          "time"], rows))
        print(body)
        if not args.no_write:
            update_section("bench_sparse:sst2", body)
        return
    if args.what == "speed":
        res = bench_speed(variants, args.rounds, args.steps, args.warmup)
        body = (header(f"Sparse fine-tuning step time: {title}") + f"- {args.rounds} interleaved rounds of "
                f"{args.steps} steps after {args.warmup} warm-up steps; ratios of per-step medians, [interquartile "
                "range of per-round ratios]; the last column uses means (SpIEL's gradient-watching steps are "
                "slower)\n\n" + speed_table(res))
        key = "bench_sparse:speed"
    else:
        mem = bench_memory(variants, args.mem_steps)
        body = (header(f"Sparse fine-tuning peak memory: {title}") + f"- one fresh process per variant, "
                f"{args.mem_steps} steps, peak RSS (VmHWM, includes the model)\n\n" + memory_table(mem))
        key = "bench_sparse:memory"
    print(body)
    if not args.no_write:
        update_section(key, body)


if __name__ == "__main__":
    main()
