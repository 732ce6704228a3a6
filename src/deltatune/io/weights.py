"""Model weights read one tensor at a time from safetensors files (nothing else is loaded).

A :class:`WeightStore` opens a ``.safetensors`` file, or a model folder holding ``model.safetensors`` or the shards
listed in ``model.safetensors.index.json`` (any ``*.safetensors`` otherwise), and hands out single tensors on
demand. A tensor is read with one positioned read into its own buffer (the file is not memory-mapped, so the pages
of tensors already read do not stay in the process): reading a tensor costs that tensor's memory only.

The safetensors layout: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON ``{name: {"dtype",
"shape", "data_offsets": [begin, end]}}`` (offsets relative to the end of the header), then the data.

Module names in an adapter and tensor names in a checkpoint may differ by a prefix (an adapter trained on
``BertForSequenceClassification`` says ``bert.encoder...``, a ``BertModel`` checkpoint says ``encoder...``, or the
other way round): :meth:`WeightStore.module_weight` accepts either direction when exactly one tensor fits.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..layers import kind_named

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_header(f, size: int) -> tuple[dict, int]:
    """``({name: entry}, start of the data)`` of an open safetensors file of ``size`` bytes; checks every entry's
    offsets against its dtype, shape and the file size."""
    (n,) = struct.unpack("<Q", f.read(8))
    if n > min(size - 8, 100 * 2**20):
        raise ValueError("the header length is impossible")
    header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    for key, e in header.items():
        begin, end = e["data_offsets"]
        if e["dtype"] not in DTYPES:
            raise ValueError(f"{key}: dtype {e['dtype']} is not supported")
        numel = 1
        for d in e["shape"]:
            numel *= d
        if end - begin != numel * DTYPES[e["dtype"]].itemsize or not 0 <= begin <= end <= size - 8 - n:
            raise ValueError(f"{key}: its data offsets do not match its shape or lie outside the file")
    return header, 8 + n


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
    files = sorted(f for f in path.glob("*.safetensors") if not f.name.startswith("adapter_model"))
    if not files:
        raise FileNotFoundError(f"{path} holds no .safetensors weights (save the model with "
                                "model.save_pretrained(folder) or safetensors.torch.save_file)")
    return files


class WeightStore:
    """Lazy ``{tensor name: tensor}`` over a model's safetensors files; use as a context manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._files = []
        self._where: dict[str, tuple[object, int, dict]] = {}
        for name in weight_files(path):
            f = open(name, "rb")
            self._files.append(f)
            try:
                header, start = read_header(f, name.stat().st_size)
            except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
                self.close()
                raise ValueError(f"{name}: not a readable safetensors file ({e})") from None
            for key, entry in header.items():
                if key in self._where:
                    self.close()
                    raise ValueError(f"{path}: tensor {key!r} is in two of its files; point at one model")
                self._where[key] = (f, start, entry)

    def __enter__(self) -> "WeightStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __getitem__(self, key: str) -> torch.Tensor:
        f, start, entry = self._where[key]
        begin, end = entry["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        f.seek(start + begin)
        if f.readinto(memoryview(buf.numpy())) != end - begin:
            raise ValueError(f"{self.path}: {key} is cut short (truncated file?)")
        return buf.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key][2]["shape"])

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
                             "adapter was trained on? (A module the adapter keeps whole, such as a new classification "
                             "head, must be in the base checkpoint too: save the base model with its head.)")
        W = self[key]
        W = kind_named(kind).to_linear(W)
        if shape is not None and tuple(W.shape) != tuple(shape):
            raise ValueError(f"{self.path}: {key} has shape {tuple(W.shape)}, but the adapter's {module!r} needs "
                             f"(out, in) = {tuple(shape)}: not the base model the adapter was trained on")
        bias_key = self.resolve(module, "bias")
        return W, (self[bias_key] if bias_key is not None else None)
