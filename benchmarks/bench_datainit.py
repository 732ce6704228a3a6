"""Data-aware LoRA initializations on MiniLM SST-2: LoRA vs PiSSA vs CorDA-IPA vs EVA, same data and steps.

All: r=8, alpha=16, every linear layer of the encoder, the classification head trained in full, AdamW lr 2e-3 (and
2e-4 for PiSSA and CorDA, whose residual starts on W's own components), 6% warm-up, batch 16, 2,000 training sentences (one epoch, 125 steps), max length 64, seed 0.
CorDA and EVA calibrate on 64 other training sentences (8 batches of 8). Reported: dev accuracy (872 sentences),
the mean training loss over steps 1-25 and 26-50 (convergence), and the time of the initialization itself.

    python benchmarks/bench_datainit.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, header, md_table, publish  # noqa: E402

import deltatune as dt  # noqa: E402

METHODS = {  # name: (method, learning rates)
    "LoRA": (lambda: dt.LoRA(r=8, alpha=16, modules_to_save=["classifier"]), (2e-3,)),
    "PiSSA": (lambda: dt.PiSSA(r=8, alpha=16, modules_to_save=["classifier"]), (2e-3, 2e-4)),
    "CorDA-IPA": (lambda: dt.CorDA(r=8, alpha=16, modules_to_save=["classifier"]), (2e-3, 2e-4)),
    "EVA": (lambda: dt.EVA(r=8, alpha=16, modules_to_save=["classifier"]), (2e-3,)),
}


def main() -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune.train import Collator, TrainArgs, encode_classification, read_rows, set_seed, train
    from deltatune.zoo import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    rows = read_rows(DATA / "glue" / "SST-2" / "train.tsv", 2064)
    train_ex, label2id = encode_classification(rows[:2000], tok, "sentence", "label", max_length=64)
    dev_ex, _ = encode_classification(read_rows(DATA / "glue" / "SST-2" / "dev.tsv"), tok, "sentence", "label",
                                      max_length=64, label2id=label2id)
    texts = [r["sentence"] for r in rows[2000:2064]]
    calib = [dict(tok(texts[i: i + 8], padding=True, truncation=True, max_length=64, return_tensors="pt"))
             for i in range(0, 64, 8)]
    table = []
    for (name, (make, lrs)), lr in ((item, lr) for item in METHODS.items() for lr in item[1][1]):
        set_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        t0 = time.perf_counter()
        dt.attach(model, make(), data=calib)
        init = time.perf_counter() - t0
        result = train(model, train_ex, TrainArgs(lr=lr, batch_size=16, epochs=1, warmup_ratio=0.06, seed=0,
                                                  save_adapter=False, plot=False, progress=False),
                       eval_data=dev_ex, collate_fn=Collator(tok.pad_token_id))
        losses = [r["loss"] for r in result["history"] if "loss" in r]
        early, mid = sum(losses[:25]) / 25, sum(losses[25:50]) / 25
        acc = result["eval"]["eval_accuracy"]
        ranks = sorted({d.r for d in dt.deltas(model, "default").values() if hasattr(d, "r")})
        print(f"{name}: accuracy {acc:.4f}, loss {early:.3f} / {mid:.3f}, init {init:.1f}s, ranks {ranks}",
              file=sys.stderr, flush=True)
        table.append([name, f"{lr:g}", f"**{acc:.4f}**", f"{early:.3f}", f"{mid:.3f}", f"{init:.1f} s",
                      f"{ranks[0]}..{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])])
    body = (header("Data-aware initializations: MiniLM on SST-2 (LoRA, PiSSA, CorDA-IPA, EVA)") +
            "- r=8, alpha=16, all linear layers + the head, lr 2e-3 for all (and 2e-4 for the residual inits, which start "
            "from W's own components), not tuned further, batch 16, 2,000 "
            "sentences, 125 steps, seed 0; CorDA / EVA calibrate on 64 other training sentences\n\n" +
            md_table(["init", "lr", "dev accuracy", "train loss, steps 1-25", "steps 26-50", "init time", "ranks"], table))
    publish("bench_datainit:sst2", body)


if __name__ == "__main__":
    main()
