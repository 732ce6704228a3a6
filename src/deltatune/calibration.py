"""Feeding calibration batches to a model (data-aware initializers, interference diagnostics).

A batch is a dict of model keyword arguments (with ``labels`` where a loss is needed) or a tensor of input ids.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from torch import nn

from .files import write_tensors

from .layers import BaseView, base_modules, is_linear, linear_weight, unwrap
from .targets import resolve_targets
from .util import progress, run_batch


# -- the calibration pass: per-layer input statistics -------------------------------------------------------------------
STATS = ("cov", "corda", "mean")


@dataclass
class LayerStats:
    """Input statistics of one linear layer (or of several that see the same input, e.g. q/k/v):

    - ``cov``: ``C = sum_t x_t x_t^T`` over the ``tokens`` non-padding tokens (``cov_matrix()`` = ``C / tokens``);
    - ``corda``: CorDA's ``sum_b X_b^T X_b`` with every sample's ``X_b`` divided by ``|max(X_b)|`` (its signed
      largest entry), over ``samples`` samples (``corda_matrix()`` = that sum ``/ samples``);
    - ``mean``: ``sum_t x_t`` (``mean_vector()`` = ``/ tokens``).
    """

    modules: list[str]
    tokens: int = 0
    samples: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, x: torch.Tensor, keep: torch.Tensor | None, stats: tuple[str, ...]) -> None:
        """Accumulate one batch of inputs ``x`` (batch, tokens, in) with ``keep`` (batch, tokens) marking real tokens:
        the batch's products are computed in float32 and added to float64 sums."""
        x = x.detach().float()  # one batch's products in float32 (fast), accumulated in float64
        x = x.reshape(-1, 1, x.shape[-1]) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])
        if keep is not None:
            x = x * keep.reshape(x.shape[0], x.shape[1], 1).to(x.dtype)
        flat = x.reshape(-1, x.shape[-1])
        n_tokens = int(keep.sum()) if keep is not None else flat.shape[0]
        for stat in stats:
            if stat == "cov":
                update = flat.t() @ flat
            elif stat == "mean":
                update = flat.sum(0)
            else:  # corda: per sample, divided by the magnitude of its signed maximum
                scale = x.reshape(x.shape[0], -1).max(dim=1).values.abs().clamp_min(1e-12)
                xs = x / scale.view(-1, 1, 1)
                update = torch.einsum("bti,btj->ij", xs, xs)
            update = update.double()
            self.sums[stat] = self.sums[stat] + update if stat in self.sums else update
        self.tokens += n_tokens
        self.samples += x.shape[0]

    def cov_matrix(self) -> torch.Tensor:
        return self.sums["cov"] / max(self.tokens, 1)

    def corda_matrix(self) -> torch.Tensor:
        return self.sums["corda"] / max(self.samples, 1)

    def mean_vector(self) -> torch.Tensor:
        return self.sums["mean"] / max(self.tokens, 1)


class Calibration(dict):
    """``{module name: LayerStats}`` (modules sharing an input share one object); :meth:`save` / :func:`load_calibration`."""

    def save(self, path: str | Path) -> None:
        groups = list({id(s): s for s in self.values()}.values())
        tensors, meta = {}, []
        for g, s in enumerate(groups):
            for stat, t in s.sums.items():
                tensors[f"{g}.{stat}"] = t
            meta.append({"modules": s.modules, "tokens": s.tokens, "samples": s.samples})
        write_tensors(path, tensors, metadata={"deltatune_calibration": json.dumps(meta)})


def load_calibration(path: str | Path) -> Calibration:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("deltatune_calibration", "null"))
        if meta is None:
            raise ValueError(f"{path} is not a deltatune calibration file")
        out = Calibration()
        for g, m in enumerate(meta):
            s = LayerStats(m["modules"], m["tokens"], m["samples"],
                           {k.split(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.split(".", 1)[0] == str(g)})
            for mod in m["modules"]:
                out[mod] = s
    return out


def _token_mask(batch) -> torch.Tensor | None:
    """Real (non-padding) tokens of a batch: its ``attention_mask``."""
    return batch.get("attention_mask") if isinstance(batch, dict) else None


def calibrate(model: nn.Module, data: Iterable, targets="all-linear", stats: tuple[str, ...] = ("cov",),
              max_batches: int | None = None, cache: str | Path | None = None, exclude=None,
              verbose: bool = True) -> Calibration:
    """Per-layer input statistics of ``targets`` (linear layers) over calibration batches ``data``.

    Forward hooks see every target layer's input ``X`` (padding tokens dropped via the batch's ``attention_mask``);
    layers that receive the very same input tensor (q, k and v) share one :class:`LayerStats`. ``stats``: any of
    ``"cov"``, ``"corda"``, ``"mean"``. The memory needed (one ``in x in`` float64 matrix per distinct input and
    statistic) is printed before the pass starts. ``cache``: a file; when it exists and covers the targets it is
    loaded instead of running, otherwise the result is written there.
    """
    unknown = sorted(set(stats) - set(STATS))
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; choose from {STATS}")
    base = unwrap(model)
    names = resolve_targets(BaseView(base), targets, exclude)
    modules = dict(base_modules(base))
    other = [n for n in names if not is_linear(modules[n])]
    if other:  # statistics of a conv's input would be those of its unfolded patches: not collected
        raise ValueError(f"calibration collects the inputs of linear layers only, and {other[0]!r} is a "
                         f"{type(modules[other[0]]).__name__} ({len(other)} such targets): target linear layers "
                         "(targets='all-linear', or exclude the others)")
    if cache is not None and Path(cache).is_file():
        found = load_calibration(cache)
        if set(names) <= set(found) and all(s in found[n].sums for n in names for s in stats):
            return Calibration({n: found[n] for n in names})
    if verbose:
        widths = sorted({linear_weight(modules[n]).shape[1] for n in names})
        need = sum(linear_weight(modules[n]).shape[1] ** 2 for n in names) * 8 * sum(s != "mean" for s in stats)
        print(f"calibration: {len(names)} layers (inputs of width {', '.join(map(str, widths))}); statistics need at "
              f"most {need / 2**20:.0f} MB (less where layers share an input)", file=sys.stderr)
    out = Calibration()
    last: list = [None, None, 0]  # the previous hooked input (kept alive, so its storage cannot be reused) and its layer
    keep: list[torch.Tensor | None] = [None]

    def hook(name):
        def pre(module, args):
            x, prev = args[0], last[0]
            same = prev is not None and x.data_ptr() == prev.data_ptr() and x.shape == prev.shape \
                and x.stride() == prev.stride() and x._version == last[2]
            owner = last[1] if same else None  # q, k, v (gate, up) are called one after another on one input
            last[0], last[1], last[2] = x, name, x._version
            if name not in out:
                out[name] = out[owner] if owner is not None else LayerStats([])
                out[name].modules.append(name)
            if owner is None or out[owner] is not out[name]:
                mask = keep[0]
                if mask is not None and mask.numel() * x.shape[-1] == x.numel():  # (batch, tokens) even if flattened
                    out[name].add(x.reshape(*mask.shape, x.shape[-1]), mask, stats)
                else:
                    out[name].add(x, None, stats)
        return pre

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(progress(data, "calibrate")):
                if max_batches is not None and i >= max_batches:
                    break
                last[0] = last[1] = None
                keep[0] = _token_mask(batch)
                run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
        last[0] = None
        base.train(was_training)
    missing = [n for n in names if n not in out]
    if missing:
        raise ValueError(f"the calibration data never reached {missing[:3]} ({len(missing)} layers): is the data for "
                         "this model?")
    if cache is not None:
        out.save(cache)
    return out
