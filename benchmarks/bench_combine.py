"""Combining adapters and extracting LoRAs, against PEFT and against loading whole models.

``--what merge``: 8 LoRA adapters (r=16, alpha=32, all linear layers) on SmolLM2-135M with the same factors in
deltatune and in PEFT, merged with weights ``1, 0.8, ..., 0.1`` into one adapter:

- deltatune ``dt.combine`` exact (a LoRA of rank 8 x 16 = 128, factors side by side) and re-factorized to rank 16
  (truncated SVD computed on the factors);
- PEFT ``add_weighted_adapter`` with ``combination_type="cat"`` (exact, rank 128), ``"linear"`` (rank 16; weights
  ``A`` and ``B`` separately) and ``"svd"`` (rank 16; SVD of the dense weighted sum).

Reported: time per merge (median over interleaved rounds in one process; ratios to PEFT's), extra peak RSS of
the merge (a fresh process per variant, VmHWM above the RSS before merging), and exactness, the relative Frobenius
error ``||dW_merged - sum_i w_i dW_i|| / ||sum_i w_i dW_i||`` per module (max and mean over the 210 modules), next
to the optimal rank-16 error (Eckart-Young) that no rank-16 result can beat.

``--what extract``: LoRA extraction (``dt.extract``, rank 16) from a base and a "fine-tuned" checkpoint (base plus a
rank-8 update and small full-rank noise on every weight matrix) for SmolLM2-shaped models of 15, 30 (the real
SmolLM2-135M weights) and 60 and 120 layers (random weights); time and peak RSS above the process's start, next to
a naive extraction that loads both state dicts whole. One fresh process per (size, method).

    python benchmarks/bench_combine.py --what all
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lora as BL  # noqa: E402
from common import REPO, header, md_table, publish  # noqa: E402
from loras import ours_loras, peft_layers, peft_loras, random_factors  # noqa: E402

import deltatune as dt  # noqa: E402

N, R, ALPHA = 8, 16, 32  # alpha = 2r
SEED = 1000
WEIGHTS = [1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
OURS = ("ours_exact", "ours_svd16")
PEFT = ("peft_cat", "peft_linear", "peft_svd16")
OUT = REPO / "out" / "bench_combine"


# -- the merge comparison --------------------------------------------------------------------------------------------
def factors(shapes: dict[str, tuple[int, int]], i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Adapter ``i``'s ``(B, A)`` per module, the same in both libraries."""
    return random_factors(shapes, SEED + i, R)


def ours_model():
    return ours_loras(BL.load_base("smollm2").eval(), [R] * N, "all-linear", SEED)


def peft_model():
    return peft_loras(BL.load_base("smollm2").eval(), [R] * N, "all-linear", SEED)


def merge(variant: str, model) -> None:
    names = [f"a{i}" for i in range(N)]
    if variant == "ours_exact":
        dt.combine(model, names, weights=WEIGHTS, name=variant)
    elif variant == "ours_svd16":
        dt.combine(model, names, weights=WEIGHTS, rank=R, name=variant)
    else:
        kind = variant.split("_")[1].removesuffix("16")
        extra = {"svd_rank": R} if kind == "svd" else {}
        model.add_weighted_adapter(names, WEIGHTS, variant, combination_type=kind, **extra)


def unmerge(variant: str, model) -> None:
    if variant in OURS:
        dt.delete(model, variant)
    else:
        model.delete_adapter(variant)


def merged_delta(variant: str, model, m: str) -> torch.Tensor:
    if variant in OURS:
        return dt.deltas(model, variant)[m].dense().detach().double()
    return peft_layers(model)[m].get_delta_weight(variant).detach().double()


def exactness(models: dict, shapes: dict) -> tuple[dict, dict]:
    """Per variant ``(max, mean)`` relative error against the true weighted sum; and the optimal rank-16 error."""
    fs = [factors(shapes, i) for i in range(N)]
    errs = {v: [] for v in models}
    best = []
    for m in sorted(shapes):
        truth = sum(w * (ALPHA / R) * B.double() @ A.double() for w, f in zip(WEIGHTS, fs) for B, A in [f[m]])
        norm = float(truth.norm())
        S = torch.linalg.svdvals(truth)
        best.append(float(S[R:].norm()) / float(S.norm()))
        for v, model in models.items():
            errs[v].append(float((merged_delta(v, model, m) - truth).norm()) / norm)
    return ({v: (max(e), statistics.mean(e)) for v, e in errs.items()},
            {"max": max(best), "mean": statistics.mean(best)})


def merge_timing(rounds: int) -> dict:
    ours, shapes = ours_model()
    peft, peft_shapes = peft_model()
    assert shapes == peft_shapes, "the two libraries target different modules"
    times = {v: [] for v in OURS + PEFT}
    for r in range(rounds):
        order = OURS + PEFT if r % 2 == 0 else tuple(reversed(OURS + PEFT))
        for v in order:
            model = ours if v in OURS else peft
            gc.collect()
            t0 = time.perf_counter()
            merge(v, model)
            times[v].append(time.perf_counter() - t0)
            if r < rounds - 1:
                unmerge(v, model)
            print(f"  round {r} {v}: {times[v][-1]:.2f}s", file=sys.stderr, flush=True)
    # after the last round every variant's merged adapter (named after the variant) is still there
    errors, best = {}, None
    for v in OURS + PEFT:
        model = ours if v in OURS else peft
        one, best = exactness({v: model}, shapes)
        errors.update(one)
        unmerge(v, model)
    return {"times": times, "errors": errors, "best": best}


def merge_memory_child(variant: str) -> None:
    model, _ = (ours_model if variant in OURS else peft_model)()
    gc.collect()
    BL.reset_peak_rss()
    before = BL._status_mb("VmRSS")
    merge(variant, model)
    print(json.dumps({"variant": variant, "before_mb": before, "peak_mb": BL._status_mb("VmHWM")}))


def child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {args}: {out}", file=sys.stderr, flush=True)
    return out


def merge_report(rounds: int) -> str:
    res = merge_timing(rounds)
    mem = {v: child(["--merge-child", v]) for v in OURS + PEFT}
    med = {v: statistics.median(t) for v, t in res["times"].items()}
    label = {"ours_exact": "deltatune exact (rank 128)", "ours_svd16": "deltatune rank 16 (SVD on factors)",
             "peft_cat": "PEFT cat (rank 128)", "peft_linear": "PEFT linear (rank 16)",
             "peft_svd16": "PEFT svd (rank 16)"}
    rows = []
    for v in OURS + PEFT:
        ref = "peft_cat" if v == "ours_exact" else "peft_svd16"
        extra = mem[v]["peak_mb"] - mem[v]["before_mb"]
        rows.append([label[v], f"{med[v]:.2f} s", f"{med[v] / med[ref]:.3f}" if v in OURS else "-",
                     f"{extra:.0f} MB", f"{res['errors'][v][0]:.2e}", f"{res['errors'][v][1]:.2e}"])
    best = res["best"]
    return (header("Merging 8 LoRA adapters (r=16, all linear) on SmolLM2-135M") +
            f"- {rounds} interleaved rounds in one process (median time); ratio: exact vs PEFT cat, rank 16 vs PEFT "
            "svd\n- extra peak RSS: a fresh process per variant, VmHWM during the merge minus RSS before it\n"
            "- error: relative Frobenius error of the merged update against the true weighted sum, max / mean "
            f"over 210 modules; the optimal rank-16 error (Eckart-Young) is max {best['max']:.3f}, mean "
            f"{best['mean']:.3f}\n\n" +
            md_table(["variant", "time", "time / PEFT's", "extra peak RSS", "max rel. error", "mean rel. error"],
                     rows))


# -- extraction --------------------------------------------------------------------------------------------------------
SIZES = (15, 30, 60, 120)


def make_pair(layers: int) -> tuple[Path, Path]:
    """``(base, tuned)`` safetensors folders of a SmolLM2-shaped model with ``layers`` blocks (cached in out/)."""
    from transformers import AutoConfig, LlamaForCausalLM

    from deltatune.zoo import smollm2_path

    folder = OUT / f"smollm2_{layers}"
    base, tuned = folder / "base", folder / "tuned"
    if (tuned / "model.safetensors").is_file():
        return base, tuned
    if layers == 30:
        model = BL.load_base("smollm2")
    else:
        config = AutoConfig.from_pretrained(smollm2_path())
        config.num_hidden_layers = layers
        torch.manual_seed(layers)
        model = LlamaForCausalLM(config)
    model.save_pretrained(base, max_shard_size="20GB")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                o, n = p.shape
                U, V = torch.randn(o, 8, generator=g), torch.randn(8, n, generator=g)
                scale = 0.02 * float(p.norm()) / float((U @ V).norm())
                p.add_(U @ V * scale).add_(torch.randn(o, n, generator=g) * 1e-4 * float(p.abs().mean()))
    model.save_pretrained(tuned, max_shard_size="20GB")
    return base, tuned


def extract_child(layers: int, how: str) -> None:
    base, tuned = make_pair(layers)
    gc.collect()
    BL.reset_peak_rss()
    before = BL._status_mb("VmRSS")
    t0 = time.perf_counter()
    if how == "stream":
        record, report = dt.extract(base, tuned, rank=R)
        n = len(report.ranks)
    else:  # naive: both state dicts whole, then the same SVD per matrix
        from safetensors.torch import load_file

        from deltatune.extract import lowrank_update
        old, new = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
        n = 0
        for k, W in new.items():
            if W.ndim == 2 and not W.equal(old[k]):
                lowrank_update(W, old[k], R, None)
                n += 1
    seconds = time.perf_counter() - t0
    params = _params(base)
    print(json.dumps({"layers": layers, "how": how, "seconds": seconds, "modules": n, "params": params,
                      "before_mb": before, "peak_mb": BL._status_mb("VmHWM")}))


def _params(folder: Path) -> int:
    from deltatune.io.weights import WeightStore

    with WeightStore(folder) as s:
        return sum(int(torch.Size(s.shape(k)).numel()) for k in s.keys())


def extract_report() -> str:
    for layers in SIZES:  # build the checkpoints first (not timed)
        child(["--make-pair", str(layers)])
    res = {(L, how): child(["--extract-child", str(L), how]) for L in SIZES for how in ("stream", "naive")}
    ref = res[(30, "stream")]["seconds"]
    rows = []
    for L in SIZES:
        s, nv = res[(L, "stream")], res[(L, "naive")]
        file_mb = s["params"] * 4 / 2**20
        rows.append([f"{L} layers ({s['params'] / 1e6:.0f}M params, {file_mb:.0f} MB a checkpoint)",
                     f"{s['seconds']:.1f} s", f"{s['seconds'] / ref:.2f}", f"{s['peak_mb'] - s['before_mb']:.0f} MB",
                     f"{nv['peak_mb'] - nv['before_mb']:.0f} MB", f"{s['seconds'] / nv['seconds']:.2f}"])
    return (header("LoRA extraction (rank 16) vs model size") +
            "- SmolLM2 shapes (hidden 576, MLP 1536, vocabulary 49152); 30 layers = the real SmolLM2-135M weights\n"
            "- peak: VmHWM above the RSS before extracting, in a fresh process; the largest single tensor (the "
            "embedding, not extracted but compared) is 108 MB in float32\n- naive: load both state dicts whole, "
            "then the same per-matrix SVD\n\n" +
            md_table(["model", "time (stream)", "time / 30-layer time", "peak above start (stream)",
                      "peak above start (naive)", "time stream / naive"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", choices=["merge", "extract", "all"], default="all")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--merge-child", help=argparse.SUPPRESS)
    ap.add_argument("--extract-child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--make-pair", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.merge_child:
        return merge_memory_child(args.merge_child)
    if args.extract_child:
        return extract_child(int(args.extract_child[0]), args.extract_child[1])
    if args.make_pair:
        make_pair(args.make_pair)
        print(json.dumps({"layers": args.make_pair}))
        return
    if args.what in ("merge", "all"):
        publish("bench_combine:merge", merge_report(args.rounds))
    if args.what in ("extract", "all"):
        publish("bench_combine:extract", extract_report())


if __name__ == "__main__":
    main()
