#!/usr/bin/env python
"""Quality: SST-2 dev accuracy after one epoch on the first 4,000 training rows, same seed and data order.

Variants (all MiniLM-L6 with a fresh 2-way head drawn from the same seed, trained by ``deltatune.train.train``):

- ``lora``: ``dt.LoRA(r=8, alpha=16, targets="all-linear", modules_to_save=["classifier"])``, lr 1e-3;
- ``peft``: PEFT ``LoraConfig`` with the same r, alpha, targets and ``modules_to_save``, lr 1e-3 (reference);
- ``full``: every weight trains, lr 5e-5 (the usual full fine-tuning rate; LoRA needs a larger one).

Batch 32, max length 64, linear decay after 6 % warm-up, AdamW, weight decay 0, dropout as the model has it.

    python benchmarks/bench_quality.py                 # all three, about 6 minutes on 2 cores
    python benchmarks/bench_quality.py --variants lora,full --rows 1000
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, header, md_table, update_section  # noqa: E402

import torch  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.train import Collator, TrainArgs, encode_classification, read_rows, set_seed, train  # noqa: E402
from deltatune.zoo import minilm_path  # noqa: E402

LR = {"lora": 1e-3, "peft": 1e-3, "full": 5e-5}


def build(variant: str, seed: int):
    from transformers import AutoModelForSequenceClassification

    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2, local_files_only=True)
    if variant == "lora":
        dt.attach(model, dt.LoRA(r=8, alpha=16, targets="all-linear", modules_to_save=["classifier"]))
    elif variant == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                 modules_to_save=["classifier"]))
    elif variant != "full":
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(LR)}")
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="lora,peft,full")
    ap.add_argument("--rows", type=int, default=4000, help="first N SST-2 training rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    sst2 = DATA / "glue" / "SST-2"
    train_ex, label2id = encode_classification(read_rows(sst2 / "train.tsv", args.rows), tok, "sentence", "label",
                                               max_length=64)
    dev_ex, _ = encode_classification(read_rows(sst2 / "dev.tsv"), tok, "sentence", "label", max_length=64,
                                      label2id=label2id)
    rows = []
    for variant in args.variants.split(","):
        model = build(variant, args.seed)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        targs = TrainArgs(lr=LR[variant], batch_size=32, epochs=1, warmup_ratio=0.06, seed=args.seed,
                          save_adapter=False, plot=False)
        start = time.perf_counter()
        result = train(model, train_ex, targs, eval_data=dev_ex, collate_fn=Collator(tok.pad_token_id))
        secs = time.perf_counter() - start
        acc = result["eval"]["eval_accuracy"]
        print(f"{variant}: dev accuracy {acc:.4f} after {result['steps']} steps ({secs:.0f} s)", file=sys.stderr)
        rows.append([variant, f"{trainable:,}", f"{LR[variant]:g}", str(result["steps"]), f"**{acc:.4f}**",
                     f"{result['eval']['eval_loss']:.4f}", f"({secs:.0f} s)"])
        del model

    body = [header("Quality: SST-2 after one epoch, LoRA vs full fine-tuning (MiniLM-L6)"),
            f"- setup: first {args.rows:,} SST-2 training rows, 1 epoch, batch 32, max length 64, AdamW, linear decay "
            f"after 6 % warm-up, seed {args.seed}; dev set ({len(dev_ex)} rows). LoRA: r=8, alpha=16, all-linear, "
            "classifier head trained in full (`modules_to_save`), same for PEFT.\n",
            md_table(["variant", "trainable params", "lr", "steps", "dev accuracy", "dev loss", "train time"], rows)]
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        update_section("bench_quality:sst2", text)


if __name__ == "__main__":
    main()
