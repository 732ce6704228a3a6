"""Low-rank compression of SmolLM2-135M, and the cost of the calibration pass.

``--what ppl``: perplexity on held-out text (GSM8K test questions and answers) after removing 10 / 20 / 30% of the
model's parameters with ``dt.compress`` from every linear layer of the decoder (embeddings and the tied head stay),
for plain SVD, activation-aware SVD (input covariance from 32 Alpaca instruction/response samples) and
Fisher-weighted SVD (squared gradients of the causal-LM loss on the same samples). Target: at 20%, activation-aware
SVD's perplexity increase is at most half of plain SVD's.

``--what calibration``: time and peak memory of ``dt.calibrate(model, data, stats=("cov",))`` on SmolLM2 against
the number of calibration samples (128 tokens each), one fresh process per size.

    python benchmarks/bench_compress.py --what all
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lora as BL  # noqa: E402
from common import DATA, REPO, header, md_table, publish  # noqa: E402

import deltatune as dt  # noqa: E402

OUT = REPO / "out" / "bench_compress"
RATIOS = (0.1, 0.2, 0.3)
METHODS = ("svd", "activation", "fisher")


def tokenizer():
    from transformers import AutoTokenizer

    from deltatune.zoo import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


def calibration_batches(n: int = 32, length: int = 256) -> list[dict]:
    """``n`` Alpaca instruction + response texts, one per batch, with causal-LM labels."""
    rows = json.loads((DATA / "alpaca" / "alpaca_5000.json").read_text())[:n]
    tok = tokenizer()
    out = []
    for r in rows:
        text = f"{r['instruction']}\n{r['input']}\n{r['output']}".strip()
        b = dict(tok(text, return_tensors="pt", truncation=True, max_length=length))
        b["labels"] = b["input_ids"].clone()
        out.append(b)
    return out


def heldout_batches(n: int = 100, length: int = 256) -> list[dict]:
    tok = tokenizer()
    out = []
    with open(DATA / "gsm8k" / "test.jsonl") as f:
        for line, _ in zip(f, range(n)):
            r = json.loads(line)
            b = dict(tok(f"{r['question']}\n{r['answer']}", return_tensors="pt", truncation=True, max_length=length))
            b["labels"] = b["input_ids"].clone()
            out.append(b)
    return out


def perplexity(model, batches) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            n = int(b["input_ids"].shape[1]) - 1
            nll += float(model(**b).loss) * n
            count += n
    return math.exp(nll / count)


def bench_ppl() -> str:
    OUT.mkdir(parents=True, exist_ok=True)
    calib, held = calibration_batches(), heldout_batches()
    base = BL.load_base("smollm2").eval()
    total = sum(p.numel() for p in base.parameters())
    base_ppl = perplexity(base, held)
    print(f"  base perplexity {base_ppl:.3f}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    cal = dt.calibrate(base, calib, stats=("cov",), cache=OUT / "cov.safetensors")
    cal_time = time.perf_counter() - t0
    rows, res = [], {}
    for ratio in RATIOS:
        for method in METHODS:
            model = BL.load_base("smollm2").eval()
            t0 = time.perf_counter()
            dt.compress(model, ratio=ratio, method=method, data=calib if method == "fisher" else None,
                        calibration=cal if method == "activation" else None)
            seconds = time.perf_counter() - t0
            params = sum(p.numel() for p in model.parameters())
            ppl = perplexity(model, held)
            res[(ratio, method)] = ppl
            print(f"  {ratio:.0%} {method}: ppl {ppl:.3f} ({params / total:.3f} of the parameters, {seconds:.1f}s)",
                  file=sys.stderr, flush=True)
            rows.append([f"{ratio:.0%}", method, f"{params / total:.3f}", f"{ppl:.2f}", f"{ppl - base_ppl:+.2f}",
                         f"{seconds:.0f} s"])
    gap = {r: (res[(r, "activation")] - base_ppl) / (res[(r, "svd")] - base_ppl) for r in RATIOS}
    return (header("Low-rank compression of SmolLM2-135M: perplexity on held-out text") +
            f"- held-out: 100 GSM8K test questions with answers (up to 256 tokens); base perplexity {base_ppl:.2f}\n"
            "- calibration: 32 Alpaca instruction/response samples (up to 256 tokens); input covariance pass "
            f"{cal_time:.0f} s (cached afterwards); Fisher: squared gradients of the causal-LM loss on the same samples\n"
            "- every linear layer of the decoder is a candidate; ranks allocated globally to meet the ratio\n"
            "- activation-aware increase / plain increase: " +
            ", ".join(f"{r:.0%}: **{g:.2g}**" for r, g in gap.items()) + " (target at 20%: <= 0.5)\n\n" +
            md_table(["parameters removed", "method", "parameters left", "perplexity", "increase", "compress time"],
                     rows))


def calibration_child(n: int) -> None:
    tok = tokenizer()
    rows = json.loads((DATA / "alpaca" / "alpaca_5000.json").read_text())
    texts = [f"{r['instruction']} {r['output']}" for r in rows]
    ids = tok(" ".join(texts[: 4 * n + 100]), return_tensors="pt")["input_ids"][0]
    batches = [{"input_ids": ids[i * 128: (i + 1) * 128].unsqueeze(0)} for i in range(n)]
    model = BL.load_base("smollm2").eval()
    BL.reset_peak_rss()
    before = BL._status_mb("VmRSS")
    t0 = time.perf_counter()
    dt.calibrate(model, batches, stats=("cov",), verbose=False)
    print(json.dumps({"samples": n, "seconds": time.perf_counter() - t0,
                      "extra_mb": BL._status_mb("VmHWM") - before}))


def bench_calibration() -> str:
    rows = []
    for n in (8, 32, 128):
        proc = subprocess.run([sys.executable, __file__, "--calibration-child", str(n)], capture_output=True,
                              text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  calibration {r}", file=sys.stderr, flush=True)
        rows.append([str(n), f"{r['seconds']:.1f} s", f"{r['seconds'] / n:.2f} s", f"{r['extra_mb']:.0f} MB"])
    return (header("Calibration pass on SmolLM2-135M vs number of samples") +
            "- samples of 128 tokens, one per batch; statistic: input covariance (float64), shared by layers that "
            "see one input (q/k/v, gate/up): 120 matrices of 576^2 or 1536^2\n- extra peak: VmHWM above the RSS "
            "before the pass, in a fresh process\n\n" +
            md_table(["samples", "time", "time per sample", "extra peak memory"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", choices=["ppl", "calibration", "all"], default="all")
    ap.add_argument("--calibration-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.calibration_child:
        return calibration_child(args.calibration_child)
    if args.what in ("ppl", "all"):
        publish("bench_compress:ppl", bench_ppl())
    if args.what in ("calibration", "all"):
        publish("bench_compress:calibration", bench_calibration())


if __name__ == "__main__":
    main()
