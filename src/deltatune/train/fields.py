"""Dataclasses from mappings (YAML sections): unknown keys and values of the wrong type are clear errors."""
from __future__ import annotations

import dataclasses


def typed_fields(cls, d: dict, noun: str, where: str = "") -> dict:
    """``d`` checked against the fields of dataclass ``cls``: unknown keys raise ``ValueError`` listing the allowed
    ones; ``float`` / ``int`` / ``bool`` fields (optional ones too) are converted or rejected. Numbers written as
    strings are accepted, as YAML reads ``1e-4`` (no dot) as the string ``'1e-4'``. ``noun`` and ``where`` name
    the keys in messages: ``unknown {noun}(s) [...]{where}``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown {noun}(s) {unknown}{where}; allowed: {list(fields)}")
    return {k: _typed(f"{noun} {k}{where}", v, fields[k].type) for k, v in d.items()}


def _typed(label: str, value, annotation: str):
    """``value`` as the field's type (``float``, ``int``, ``bool`` or optional ones); other fields pass through."""
    kind = next((t for t in ("bool", "float", "int") if annotation.startswith(t)), None)
    if value is None or kind is None:
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError(f"{label} must be true or false, got {value!r}")
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or (kind == "int" and not number.is_integer()):
        raise ValueError(f"{label} must be a{'n integer' if kind == 'int' else ' number'}, got {value!r}")
    return int(number) if kind == "int" else number


__all__ = ["typed_fields"]
