"""Atomic file writes: write to a temporary file in the same folder, fsync, then ``os.replace``."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    _atomic(Path(path), w)


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_json(path: str | Path) -> dict:
    """The JSON in ``path``; a file that is not JSON raises ``ValueError`` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is damaged or not an adapter config") from None


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors in safetensors file ``path``; a damaged or truncated file raises ``ValueError`` naming it."""
    try:
        return load_file(str(path))
    except OSError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorsError (not an OSError) for bad headers
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it is truncated or damaged: save the "
                         "adapter again") from None


def write_adapter(folder: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Weights first, config last: a folder with a config always has the weights that go with it."""
    folder = Path(folder)
    write_tensors(folder / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    write_json(folder / CONFIG_NAME, config)


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}: not an adapter folder")
    if not w_path.is_file():
        raise FileNotFoundError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    return read_json(cfg_path), read_tensors(w_path)


def adapter_folders(path: str | Path) -> dict[str, Path]:
    """``{name: folder}``: the folder itself (name from its config) or one subfolder per saved adapter."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return {"": path}
    subs = {p.name: p for p in sorted(path.iterdir()) if (p / CONFIG_NAME).is_file()} if path.is_dir() else {}
    if not subs:
        raise FileNotFoundError(f"no adapter found at {path}: expected {CONFIG_NAME} there or in its subfolders")
    return subs
