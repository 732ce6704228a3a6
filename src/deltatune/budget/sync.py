"""Identical decisions on every ``torch.distributed`` rank: rank 0's scores are the ones every rank uses."""
from __future__ import annotations

import torch
import torch.distributed as dist


def broadcast_(tensors: list[torch.Tensor]) -> None:
    """Overwrite ``tensors`` with rank 0's values (one flat broadcast); a no-op without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    if dist.get_backend() == "nccl" and not flat.is_cuda:
        flat = flat.cuda()
    dist.broadcast(flat, src=0)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t).to(t.dtype))
        offset += n


def broadcast_exact_(tensors: list[torch.Tensor]) -> None:
    """Like :func:`broadcast_`, one call per tensor in its own dtype (integer indices stay exact)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for t in tensors:
        buf = t.cuda() if dist.get_backend() == "nccl" and not t.is_cuda else t
        dist.broadcast(buf, src=0)
        if buf is not t:
            t.copy_(buf)
