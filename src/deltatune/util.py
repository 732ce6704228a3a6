"""Small helpers every floor may use: progress bars, feeding a batch to a model, resolving user paths.

Imports only the standard library and torch (``tqdm`` when a bar is drawn).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from torch import nn


def progress(data: Iterable, desc: str):
    """``data`` wrapped in a transient progress bar (silent when not on a terminal)."""
    from tqdm.auto import tqdm  # optional until a bar is drawn (start-up speed of the CLI)

    return tqdm(data, desc=desc, leave=False, disable=None)


def run_batch(model: nn.Module, batch):
    """``model(**batch)`` for a dict, ``model(batch)`` otherwise."""
    return model(**batch) if isinstance(batch, dict) else model(batch)


def resolve_path(path: str | os.PathLike | None, base: Path) -> str | None:
    """``path`` with ``~`` expanded, relative to ``base`` (the folder of the YAML file that names it)."""
    if path is None:
        return None
    p = Path(os.path.expanduser(str(path)))
    return str(p if p.is_absolute() else base / p)
