"""Feeding calibration batches to a model (data-aware initializers, interference diagnostics), and the progress bar
of every long loop.

A batch is a dict of model keyword arguments (with ``labels`` where a loss is needed) or a tensor of input ids.
"""
from __future__ import annotations

from typing import Iterable

from torch import nn


def run_batch(model: nn.Module, batch):
    """``model(**batch)`` for a dict, ``model(batch)`` otherwise."""
    return model(**batch) if isinstance(batch, dict) else model(batch)


def progress(data: Iterable, desc: str):
    """``data`` wrapped in a transient progress bar (silent when not on a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(data, desc=desc, leave=False, disable=None)
