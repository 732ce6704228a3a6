"""Shared fixtures: real pretrained models from PyPI packages and real data from ../shared/data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)

SHARED = Path(os.environ.get("DELTATUNE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DATA = SHARED / "data"


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


def make_minilm(path, num_labels=2, seed=0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # the classification head is freshly initialized: seed it
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels).eval()


def make_smollm(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


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


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def randomize(model, name, std=0.02, seed=1):
    """Give adapter ``name`` non-zero trainable factors so tests see its effect."""
    import deltatune as dt

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in dt.deltas(model, name).values():
            for p in d.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
