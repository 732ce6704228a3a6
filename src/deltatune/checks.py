"""Argument and value checks shared by the public verbs, method configs, checkpoints and delta specs.

Each check returns the value in its canonical type or raises with a message that names ``what`` (an argument, a
config key, a tensor and its file) and says what a valid value is. ``bool`` is never accepted as a number (``True``
is an ``int`` to Python, but ``r=True`` is a mistake).
"""
from __future__ import annotations

import math
import numbers

import torch


def is_number(value) -> bool:
    """A real number that is not a ``bool`` (Python ints, floats, numpy scalars)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def finite_number(value, what: str, nonzero: bool = False) -> float:
    """``float(value)`` for a finite real number (non-zero with ``nonzero``); ``TypeError`` / ``ValueError``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype == torch.bool:
        value = value.item()
    if not is_number(value):
        raise TypeError(f"{what} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if nonzero and value == 0.0:
        raise ValueError(f"{what} must not be 0 (nothing would be applied or trained)")
    return value


def positive_int(value, what: str, allow_zero: bool = False) -> int:
    """``value`` as an ``int`` when it is an integer > 0 (>= 0 with ``allow_zero``); a ``bool`` or ``'8'`` is refused."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{what} must be {'>= 0' if allow_zero else 'a positive integer'}, got {value!r}")
    return int(value)


CORRUPT = "the checkpoint is corrupt or was saved from a diverged run; retrain or load another checkpoint"


def finite_tensor(t: torch.Tensor, what: str, hint: str = CORRUPT) -> None:
    """Refuse a floating tensor holding NaN or +-inf (one reduction; integer tensors always pass)."""
    if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{what} holds {bad} NaN/inf value(s) of {t.numel()}: {hint}")


def export_rank_energy(rank, energy) -> None:
    """``rank``: a positive integer or ``None``; ``energy``: a share in ``(0, 1]`` or ``None``."""
    if rank is not None:
        positive_int(rank, "rank")
    if energy is not None:
        e = finite_number(energy, "energy")
        if not 0.0 < e <= 1.0:
            raise ValueError(f"energy is the share of ||dW||_F^2 to keep and must be in (0, 1], got {energy!r}")
