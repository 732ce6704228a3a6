"""FSDP2 (``torch.distributed.fsdp.fully_shard``) support: what deltatune does with a model whose parameters are
sharded ``DTensor``\\ s.

After ``fully_shard`` every registered parameter is a ``DTensor`` sharded on dim 0 outside ``forward`` and a plain
full tensor inside it, so the forward pass, the fused autograd nodes and a frozen base with trainable deltas in
one group need nothing special. What runs *outside* ``forward`` has to take care:

- **saving** gathers each sharded tensor (``full_tensor()``, a collective: every rank calls ``dt.save``) and only
  rank 0 writes, so the checkpoint is the ordinary one, loadable by one process or by PEFT;
- **changing a parameter's shape or identity** (AdaLoRA's ``shrink``, IncreLoRA's growth, SoRA's pruning, SpIEL's
  regrowth) after sharding is silently undone by FSDP (the next forward still sees the old sharded parameter), so
  deltas refuse it with an error that names the fix (mask instead, e.g. ``AdaLoRA(shrink="never")``; or train
  those methods with DDP);
- **merging, attaching and loading** on a sharded model are refused: they read or replace the weights FSDP owns.
  Attach (or ``dt.load``) before ``fully_shard``; merge on the gathered model (``dt.save`` it, ``dt.load`` the
  file onto an unsharded base, merge there).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed support: nothing can be sharded
        return None
    return DTensor


def is_sharded(t: Any) -> bool:
    """``t`` is a ``DTensor`` (a parameter FSDP2 manages, or a value computed from one)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def full(t: Any) -> Any:
    """The whole tensor of ``t`` (``DTensor.full_tensor()``, a collective); ``t`` itself when not sharded. Nested
    dicts, lists and tuples are gathered element by element."""
    if is_sharded(t):
        return t.full_tensor()
    if isinstance(t, dict):
        return {k: full(v) for k, v in t.items()}
    if isinstance(t, (list, tuple)):
        return type(t)(full(v) for v in t)
    return t


def shard_like(t: torch.Tensor, ref: Any) -> Any:
    """``t`` (a whole tensor, the same on every rank) laid out like ``ref``: sharded as ``ref`` is when ``ref`` is a
    ``DTensor`` (each rank keeps its part), ``t`` itself otherwise."""
    if not is_sharded(ref):
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t, ref.device_mesh, ref.placements)


def owned(t: Any) -> Any:
    """Copies of the tensors in ``t`` (nested dicts, lists, tuples; other values as they are): what was read inside
    :func:`gathered` must be copied before the block ends, when FSDP frees the unsharded storage."""
    if isinstance(t, torch.Tensor):
        return t.detach().clone()
    if isinstance(t, dict):
        return {k: owned(v) for k, v in t.items()}
    if isinstance(t, (list, tuple)) and not hasattr(t, "_fields"):
        return type(t)(owned(v) for v in t)
    return t


def sharded_parameters(module: nn.Module) -> list[str]:
    """Names of ``module``'s parameters that FSDP2 has sharded."""
    return [n for n, p in module.named_parameters() if is_sharded(p)]


def refuse_sharded(module: nn.Module, action: str, fix: str) -> None:
    """Raise a clear error when ``module`` holds FSDP2-sharded parameters and ``action`` cannot run on shards."""
    names = sharded_parameters(module)
    if names:
        raise RuntimeError(f"cannot {action}: the model is sharded by FSDP2 (fully_shard; e.g. {names[0]!r} is a "
                           f"DTensor). {fix}")


def refuse_replacing(module: nn.Module, name: str, action: str, fix: str) -> None:
    """Raise when ``module.<name>`` is a sharded parameter: replacing it after ``fully_shard`` would be silently
    undone by FSDP (the next forward all-gathers the old shards)."""
    if is_sharded(getattr(module, name, None)):
        raise RuntimeError(f"cannot {action} under FSDP2: {type(module).__name__}.{name} is sharded and FSDP "
                           f"would silently keep the old parameter. {fix}")


def writer() -> bool:
    """Whether this process writes shared files: rank 0 of an initialized process group, or the only process."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier_if_distributed() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def zero_where_(param: torch.Tensor, drop: torch.Tensor) -> None:
    """``param[drop] = 0`` in place for a boolean ``drop`` over the whole (unsharded) tensor; on an FSDP2 parameter
    the mask is laid out like the parameter's shards first (``distribute_tensor``: every rank holds the same
    ``drop``), so each rank zeroes its own rows."""
    with torch.no_grad():
        if is_sharded(param):
            param.mul_(shard_like((~drop).to(param.dtype), param))
        else:
            param[drop] = 0


@contextlib.contextmanager
def gathered(module: nn.Module):
    """Inside the block every FSDP2 unit of ``module`` is unsharded (its parameters are the plain full tensors, as
    inside ``forward``), so code written for ordinary tensors (a delta's ``tensors()``, its exported factors) runs
    unchanged; resharded on exit. A collective: every rank enters it. A no-op for an unsharded model."""
    if not sharded_parameters(module):
        yield module
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield module
        return
    for m in units:
        m.unshard()
    try:
        yield module
    finally:
        for m in units:
            m.reshard()
