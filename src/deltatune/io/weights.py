"""Model weights read one tensor at a time from safetensors files (nothing else is loaded).

A :class:`WeightStore` opens a ``.safetensors`` file, or a model folder holding ``model.safetensors`` or the shards
listed in ``model.safetensors.index.json`` (any ``*.safetensors`` otherwise), and hands out single tensors on
demand: the files are memory-mapped, so reading a tensor costs that tensor's memory only.

Module names in an adapter and tensor names in a checkpoint may differ by a prefix (an adapter trained on
``BertForSequenceClassification`` says ``bert.encoder...``, a ``BertModel`` checkpoint says ``encoder...``, or the
other way round): :meth:`WeightStore.module_weight` accepts either direction when exactly one tensor fits.
"""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a model: ``path`` itself, or the model's files in folder ``path``."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such safetensors file or model folder")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no .safetensors weights (save the model with "
                                "model.save_pretrained(folder) or safetensors.torch.save_file)")
    return files


class WeightStore:
    """Lazy ``{tensor name: tensor}`` over a model's safetensors files; use as a context manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._stack = ExitStack()
        self._where: dict[str, object] = {}
        for f in weight_files(path):
            handle = self._stack.enter_context(safe_open(str(f), framework="pt"))
            for key in handle.keys():
                self._where[key] = handle

    def __enter__(self) -> "WeightStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key].get_slice(key).get_shape())

    def resolve(self, module: str, param: str = "weight") -> str | None:
        """The tensor name of ``module.param``, allowing a prefix on either side; ``None`` when absent or ambiguous."""
        exact = f"{module}.{param}"
        if exact in self._where:
            return exact
        fits = [k for k in self._where if k.endswith(f".{exact}")
                or (k.endswith(f".{param}") and module.endswith("." + k[: -len(param) - 1]))]
        return fits[0] if len(fits) == 1 else None

    def module_weight(self, module: str, kind: str = "linear", shape: tuple[int, int] | None = None):
        """``(weight in the linear layout (out x in), bias or None)`` of ``module`` (``kind`` as in an adapter
        spec: ``conv1d`` and ``embedding`` store ``in x out`` and are transposed); raises when the checkpoint lacks it or its shape
        is not ``shape``."""
        key = self.resolve(module)
        if key is None:
            raise ValueError(f"{self.path} has no (unique) weight for module {module!r}: is it the base model the "
                             "adapter was trained on?")
        W = self[key]
        W = W if kind == "linear" else W.t()
        if shape is not None and tuple(W.shape) != tuple(shape):
            raise ValueError(f"{self.path}: {key} has shape {tuple(W.shape)}, but the adapter's {module!r} needs "
                             f"(out, in) = {tuple(shape)}: not the base model the adapter was trained on")
        bias_key = self.resolve(module, "bias")
        return W, (self[bias_key] if bias_key is not None else None)
