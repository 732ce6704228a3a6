"""Serving many adapters from one model: mixed-adapter batches, the merged single-adapter path, switching and hot
loading, deltatune vs PEFT.

Setup: ``N`` LoRA adapters (4 or 16; ranks alternating 8 and 16, alpha = 2r, every linear layer of the encoder /
decoder) with the same factors in deltatune and in PEFT, and a batch whose rows are assigned to adapters

- ``uniform``: round-robin over the ``N`` adapters;
- ``skewed``: Zipf-like, adapter ``k`` with probability proportional to ``1 / (k + 1)^1.5`` (seeded).

Workloads (inference, no gradients):

- MiniLM (BERT encoder): one forward pass of a batch of 32 x 128 tokens;
- SmolLM2-135M: ``generate`` with the KV cache, 16 prompts of 128 tokens, exactly 32 new tokens, greedy.

Variants, all in one process, interleaved over ``--rounds`` rounds (median time): ``ours`` (``model(**batch,
adapter_names=rows)``), ``peft`` (PEFT's ``adapter_names``), and ``merged``: the same batch on one adapter merged
into the weights (the base model's speed: what a single-adapter deployment runs at). Ratios: ``peft / ours`` time
(= our throughput over PEFT's; target >= 2) and ``merged / ours`` (our mixed throughput relative to the merged
single adapter; target >= 0.7).

``--what switch``: on SmolLM2 with 16 adapters loaded, the median time of making another adapter active
(``dt.set_active`` / PEFT ``set_adapter``), of hot-loading one more adapter from disk into the running model
(``dt.load`` / PEFT ``load_adapter``), and of re-attaching (unload everything, load all 17 onto the plain model),
and the merged path's break-even: how many consecutive batches on one adapter pay for merging and unmerging it.

    python benchmarks/bench_serving.py --what all
"""
from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lora as BL  # noqa: E402
from common import header, md_table, sst2_rows, publish  # noqa: E402
from loras import ours_loras, peft_loras  # noqa: E402

import deltatune as dt  # noqa: E402

WORKLOADS = {
    "minilm": dict(label="MiniLM forward, batch 32 x 128 tokens", batch=32, seq=128,
                   targets=["query", "key", "value", "dense"]),
    "smollm2": dict(label="SmolLM2-135M generate, 16 prompts x 128 tokens + 32 new tokens", batch=16, seq=128,
                    new=32, targets="all-linear"),
}


SEED = 100


def rank_of(k: int) -> int:
    return 8 if k % 2 == 0 else 16


def assign(n_rows: int, n_adapters: int, mix: str) -> list[str]:
    if mix == "uniform":
        return [f"a{i % n_adapters}" for i in range(n_rows)]
    rng = random.Random(0)
    weights = [1 / (k + 1) ** 1.5 for k in range(n_adapters)]
    return [f"a{rng.choices(range(n_adapters), weights)[0]}" for _ in range(n_rows)]


def batch_for(name: str, cfg: dict) -> dict:
    from transformers import AutoTokenizer

    from deltatune.zoo import minilm_path, smollm2_path

    tok = AutoTokenizer.from_pretrained(minilm_path() if name == "minilm" else smollm2_path())
    text = " ".join(t for t, _ in sst2_rows("train", 4000))
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    rows = torch.stack([ids[i * cfg["seq"]: (i + 1) * cfg["seq"]] for i in range(cfg["batch"])])
    return {"input_ids": rows, "attention_mask": torch.ones_like(rows)}


def load(name: str):
    return BL.load_base(name).eval()


def ours_model(name: str, cfg: dict, n: int):
    return ours_loras(load(name), [rank_of(k) for k in range(n)], cfg["targets"], SEED)[0]


def peft_model(name: str, cfg: dict, n: int):
    return peft_loras(load(name), [rank_of(k) for k in range(n)], cfg["targets"], SEED)[0]


def run(name: str, cfg: dict, model, batch: dict, rows: list[str] | None):
    extra = {} if rows is None else {"adapter_names": rows}
    with torch.no_grad():
        if name == "minilm":
            return model(**batch, **extra).logits
        return model.generate(**batch, **extra, max_new_tokens=cfg["new"], min_new_tokens=cfg["new"],
                              do_sample=False, pad_token_id=0)


def bench_mixed(name: str, n: int, rounds: int) -> dict:
    cfg = WORKLOADS[name]
    batch = batch_for(name, cfg)
    ours, peft = ours_model(name, cfg, n), peft_model(name, cfg, n)
    merged = ours_model(name, cfg, 1)
    dt.merge(merged, "a0")
    out = {}
    for mix in ("uniform", "skewed"):
        rows = assign(cfg["batch"], n, mix)
        same = run(name, cfg, ours, batch, rows), run(name, cfg, peft, batch, rows)  # warm-up, and a check
        if name == "minilm":
            torch.testing.assert_close(same[0], same[1], atol=1e-3, rtol=1e-3)
        else:
            agree = float((same[0] == same[1]).float().mean())
            assert agree > 0.8, f"deltatune and PEFT generate different tokens ({agree:.2f} agree)"
        run(name, cfg, merged, batch, None)
        times = {"ours": [], "peft": [], "merged": []}
        for r in range(rounds):
            order = ["ours", "peft", "merged"][r % 3:] + ["ours", "peft", "merged"][: r % 3]
            for v in order:
                model = {"ours": ours, "peft": peft, "merged": merged}[v]
                gc.collect()
                t0 = time.perf_counter()
                run(name, cfg, model, batch, None if v == "merged" else rows)
                times[v].append(time.perf_counter() - t0)
            print(f"  {name} N={n} {mix} round {r}: " + ", ".join(f"{v} {t[-1]:.2f}s" for v, t in times.items()),
                  file=sys.stderr, flush=True)
        out[mix] = {v: statistics.median(t) for v, t in times.items()}
        out[mix]["adapters_in_batch"] = len(set(rows))
    return out


def mixed_table(name: str, res: dict) -> str:
    rows = []
    for n, by_mix in res.items():
        for mix, t in by_mix.items():
            rows.append([f"{n}", mix, f"{t['adapters_in_batch']}", f"{t['ours']:.2f} s", f"{t['peft']:.2f} s",
                         f"{t['merged']:.2f} s", f"**{t['peft'] / t['ours']:.2f}**", f"**{t['merged'] / t['ours']:.2f}**"])
    return md_table(["adapters", "mix", "adapters in the batch", "ours", "PEFT", "one merged adapter",
                     "our throughput / PEFT's (target >= 2)", "ours / merged (target >= 0.7)"], rows)


# -- switching, hot loading, the merged path ---------------------------------------------------------------------------
def median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_switch(repeats: int) -> str:
    name, n = "smollm2", 16
    cfg = WORKLOADS[name]
    ours, peft = ours_model(name, cfg, n), peft_model(name, cfg, n)
    tmp = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    dt.save(ours, tmp / "ours")
    peft.save_pretrained(tmp / "peft")
    res = {}
    k = iter(range(10**6))
    res["switch"] = (median_time(lambda: dt.set_active(ours, f"a{next(k) % n}"), repeats * 5),
                     median_time(lambda: peft.set_adapter(f"a{next(k) % n}"), repeats * 5))

    def hot_ours():
        i = next(k)
        dt.load(ours, tmp / "ours" / "a1", name=f"hot{i}", activate=False)
        dt.delete(ours, f"hot{i}")

    def hot_peft():
        i = next(k)
        peft.load_adapter(tmp / "peft" / "a1", adapter_name=f"hot{i}")
        peft.delete_adapter(f"hot{i}")

    res["hot-load one adapter (load + delete)"] = (median_time(hot_ours, repeats), median_time(hot_peft, repeats))

    def reattach():
        nonlocal ours
        plain = dt.unload(ours)
        ours = dt.load(plain, tmp / "ours", activate=False)

    res["re-attach all 16 (unload + load)"] = (median_time(reattach, repeats), None)
    # the merged path: merging and unmerging one adapter vs what a merged batch saves
    batch = batch_for("minilm", WORKLOADS["minilm"])
    lines = []
    for wl, model in (("smollm2", ours), ("minilm", ours_model("minilm", WORKLOADS["minilm"], n))):
        b = batch if wl == "minilm" else {k2: v[:4, :64] for k2, v in batch_for(wl, cfg).items()}
        rows = ["a0"] * b["input_ids"].shape[0]

        def fwd(m=model, b=b, rows=rows):
            with torch.no_grad():
                m(**b, adapter_names=rows)

        dt.set_serving(model, merge_single=False)
        fwd()
        unmerged = median_time(fwd, repeats)
        dt.set_serving(model, merge_single=True)
        fwd()
        merged = median_time(fwd, repeats)

        def cycle(m=model):
            dt.set_serving(m, merge_single=False)  # unmerge
            with torch.no_grad():
                dt.merge(m, "a0")
            dt.unmerge(m)

        cost = median_time(cycle, repeats)
        saving = unmerged - merged
        even = cost / saving if saving > 0 else float("inf")
        lines.append([wl if wl == "minilm" else "SmolLM2 forward, 4 x 64 tokens", f"{unmerged * 1e3:.0f} ms",
                      f"{merged * 1e3:.0f} ms", f"{cost * 1e3:.0f} ms", f"{even:.1f}"])
    table = md_table(["operation", "deltatune", "PEFT", "PEFT / deltatune"],
                     [[op, f"{o * 1e3:.1f} ms", "-" if p is None else f"{p * 1e3:.1f} ms",
                       "-" if p is None else f"{p / o:.1f}"] for op, (o, p) in res.items()])
    merged_table = md_table(["model", "batch on one adapter, unmerged", "merged", "merge + unmerge", "break-even "
                             "(consecutive batches)"], lines)
    return (header("Switching and hot loading (SmolLM2-135M, 16 LoRA adapters r 8/16, all linear)") +
            f"- medians over {repeats} (switch: {repeats * 5}) repetitions; hot-load reads one adapter from disk and "
            "installs it next to the 16 (then deletes it)\n\n" + table +
            "\n\nThe merged single-adapter path (`dt.set_serving(model, merge_single=True)`): a batch whose rows all "
            "use one adapter runs with that adapter merged; merging and unmerging cost one pass over the adapted "
            "weights, so it pays off after the break-even number of consecutive batches on that adapter:\n\n" +
            merged_table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", choices=["minilm", "smollm2", "switch", "all"], default="all")
    ap.add_argument("--adapters", default="4,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    for name in ("minilm", "smollm2"):
        if args.what in (name, "all"):
            res = {int(n): bench_mixed(name, int(n), args.rounds) for n in args.adapters.split(",")}
            body = (header(f"Mixed-adapter batches: {WORKLOADS[name]['label']}") +
                    f"- {args.rounds} interleaved rounds in one process, median time of one batch; LoRA adapters "
                    "with ranks 8 and 16 alternating, the same factors in both libraries\n\n" + mixed_table(name, res))
            publish(f"bench_serving:{name}", body)
    if args.what in ("switch", "all"):
        publish("bench_serving:switch", bench_switch(args.repeats))


if __name__ == "__main__":
    main()
