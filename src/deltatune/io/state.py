"""Training state (controller state, optimizer and scheduler state) as JSON plus safetensors, without pickle.

A *state* is a nested structure of dicts (any keys, kept as strings), lists and tuples whose leaves are JSON values
(``None``, bools, ints, finite or non-finite floats, strings) or tensors. :func:`split_state` turns it into
``(json_value, {key: tensor})``: every tensor leaf is replaced by ``{"@tensor": key}`` and stored under ``key``,
``prefix`` + the leaf's path joined by ``/``. :func:`join_state` is the inverse. Integer dict keys (torch's
optimizer state is keyed by parameter index) are written as ``{"@int": [[k, v], ...]}`` so they come back as
ints; tuples come back as lists. Non-finite floats are written as ``{"@float": "nan" | "inf" | "-inf"}`` so the
JSON stays strict.

A checkpoint keeps the tensors of a controller in the adapter's own safetensors file under the reserved prefix
:data:`CONTROLLER_PREFIX` (``@controller/``): ``@`` and ``/`` never occur in a module path, so the keys cannot
collide with ``"<module name>.<tensor name>"``, and readers of module tensors skip them.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

CONTROLLER_PREFIX = "@controller/"
_TENSOR, _INT, _FLOAT = "@tensor", "@int", "@float"


def split_state(state, prefix: str) -> tuple[object, dict[str, torch.Tensor]]:
    """``(json_value, tensors)`` for a nested state (see the module docstring); tensors are detached CPU copies."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x, path: tuple):
        where = "/".join(map(str, path)) or "/"
        if torch.is_tensor(x):
            key = prefix + "/".join(map(str, path))
            if key in tensors:
                raise ValueError(f"state key {key!r} occurs twice; use keys without '/'")
            tensors[key] = x.detach().to("cpu", copy=True).contiguous()
            return {_TENSOR: key}
        if isinstance(x, Mapping):
            if x and all(isinstance(k, int) and not isinstance(k, bool) for k in x):
                return {_INT: [[k, walk(v, (*path, k))] for k, v in x.items()]}
            bad = [k for k in x if not isinstance(k, str)]
            if bad:
                raise TypeError(f"state keys must be strings or all integers, got {bad[0]!r} at {where}")
            return {k: walk(v, (*path, k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, (*path, i)) for i, v in enumerate(x)]
        if isinstance(x, float) and not math.isfinite(x):
            return {_FLOAT: repr(x)}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot save state value of type {type(x).__name__} at {where}: only tensors, numbers, "
                        "strings, None, lists and dicts")

    return walk(state, ()), tensors


def join_state(value, tensors: Mapping[str, torch.Tensor], where: str = "checkpoint"):
    """The nested state back from :func:`split_state`'s output; ``where`` names the source in errors."""
    def walk(x):
        if isinstance(x, dict):
            if set(x) == {_TENSOR}:
                key = x[_TENSOR]
                if key not in tensors:
                    raise ValueError(f"{where}: the state refers to tensor {key!r}, which the file lacks (a "
                                     "truncated or mixed checkpoint?)")
                return tensors[key]
            if set(x) == {_INT}:
                return {int(k): walk(v) for k, v in x[_INT]}
            if set(x) == {_FLOAT}:
                return float(x[_FLOAT])
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(value)


__all__ = ["CONTROLLER_PREFIX", "join_state", "split_state"]
