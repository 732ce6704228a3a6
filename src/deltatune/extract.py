"""LoRA extraction: the low-rank adapter closest to a full fine-tune.

For every weight matrix that changed between a base model ``W`` and its fine-tuned version ``W'``, the update
``dW = W' - W`` (linear layout, out x in) is replaced by its truncated SVD (Eckart-Young: the best rank-``k``
approximation in Frobenius norm)::

    dW = U diag(S) V^T  ~  B A,    B = U_k diag(S_k),  A = V_k^T,  scale 1

with ``k = rank``, or per layer the fewest components holding ``energy`` of ``||dW||_F^2``. The relative error
``||dW - B A||_F / ||dW||_F = sqrt(sum_{i>k} S_i^2 / sum_i S_i^2)`` is reported per layer.

Tensors are streamed from the two safetensors checkpoints one pair at a time (:class:`deltatune.io.weights.
WeightStore`), so peak memory is about one layer's ``W``, ``W'`` and its SVD, whatever the model size. Modules
present only in the fine-tuned model (a new classification head) are kept whole (PEFT's ``modules_to_save``);
other changed tensors that are not weight matrices (norms, biases) cannot be a LoRA and are listed in the report.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .calibration import progress
from .io.record import AdapterRecord
from .io.weights import WeightStore
from .methods import Method
from .svd import svd_factors
from .targets import TargetSpec, _matches

#: tensor names of lookup tables (their LoRA is an embedding LoRA, ``dW`` taken on the transposed table)
EMBEDDING = re.compile(r".*(embed|\bwte|\bwpe|\bshared)[^.]*$")


@dataclass
class Extracted(Method):
    """The config recorded for an adapter extracted from a fine-tuned model (it has no initializer)."""

    name = "extracted"

    base: str | None = None
    tuned: str | None = None
    rank: int | None = None
    energy: float | None = None

    def build(self, module_name, weight, bias):
        raise ValueError("an extracted adapter is made by dt.extract(base, tuned, ...), not attached")


@dataclass
class ExtractionReport:
    """Per extracted module its rank and relative Frobenius error; tensors that changed but are not extracted."""

    ranks: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    kept_whole: list[str] = field(default_factory=list)
    skipped: dict[str, float] = field(default_factory=dict)  # tensor -> relative change ||T' - T|| / ||T||
    unchanged: int = 0

    def summary(self) -> str:
        lines = [f"{len(self.ranks)} modules extracted, {self.unchanged} unchanged weight matrices left out"]
        if self.errors:
            worst = max(self.errors, key=self.errors.get)
            mean = sum(self.errors.values()) / len(self.errors)
            ranks = sorted(self.ranks.values())
            lines.append(f"rank {ranks[0]}..{ranks[-1]} (total {sum(ranks)}); relative error mean {mean:.4f}, "
                         f"worst {self.errors[worst]:.4f} ({worst})")
        if self.kept_whole:
            lines.append(f"kept whole (new in the fine-tuned model): {', '.join(self.kept_whole)}")
        if self.skipped:
            shown = ", ".join(f"{k} ({v:.2g})" for k, v in list(self.skipped.items())[:5])
            more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            lines.append(f"changed but not a weight matrix, left out (relative change): {shown}{more}")
        return "\n".join(lines)


def lowrank_update(W_tuned: torch.Tensor, W_base: torch.Tensor, rank: int | None, energy: float | None):
    """``(B, A, relative error)``: the truncated SVD of ``dW = W_tuned - W_base`` (both linear layout)."""
    return svd_factors(W_tuned.float() - W_base.float(), rank, energy)


def _relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    norm = float(old.float().norm())
    return float((new.float() - old.float()).norm()) / (norm if norm > 0 else 1.0)


def extract(base: str | Path, tuned: str | Path, rank: int | None = None, energy: float | None = None,
            targets: TargetSpec = None, exclude: TargetSpec = None, name: str = "extracted",
            task_type: str | None = None) -> tuple[AdapterRecord, ExtractionReport]:
    """The LoRA adapter that best turns ``base`` into ``tuned`` (safetensors files or model folders).

    ``rank``: components per module; ``energy``: instead, per module the fewest components holding this share of
    ``||dW||_F^2`` (both given: ``rank`` caps the energy rank). ``targets`` / ``exclude``: which modules (a list of
    names or suffixes, or a regular expression over the whole module name; default every changed weight matrix).
    Returns the adapter (save it with :func:`deltatune.io.write_record`, or in PEFT format) and the report.
    """
    if rank is None and energy is None:
        raise ValueError("give rank= (components per module) or energy= (share of ||dW||^2 to keep, e.g. 0.9)")
    if rank is not None and rank <= 0 or energy is not None and not 0 < energy <= 1:
        raise ValueError(f"rank must be positive and energy in (0, 1], got rank={rank}, energy={energy}")
    modules, tensors, report = {}, {}, ExtractionReport()
    with WeightStore(base) as old, WeightStore(tuned) as new:
        for key in progress(new.keys(), "extract"):
            mod, _, param = key.rpartition(".")
            if targets is not None and not _matches(mod, targets) or _matches(mod, exclude):
                continue
            shape = new.shape(key)
            if len(shape) != 2 or param != "weight":
                if len(shape) and key in old and not (new_t := new[key]).equal(old_t := old[key]):
                    report.skipped[key] = _relative_change(new_t, old_t)
                continue
            kind = "embedding" if EMBEDDING.fullmatch(mod) else "linear"
            W_new = new[key] if kind == "linear" else new[key].t()
            if key not in old:  # a module only the fine-tuned model has: keep it whole
                bias = f"{mod}.bias"
                modules[mod] = {"structure": "full", "layer": kind, "out_features": shape[0] if kind == "linear"
                                else shape[1], "in_features": shape[1] if kind == "linear" else shape[0]}
                tensors[mod] = {"weight": W_new, **({"bias": new[bias]} if bias in new else {})}
                report.kept_whole.append(mod)
                continue
            if old.shape(key) != shape:
                raise ValueError(f"{key} has shape {old.shape(key)} in {base} but {shape} in {tuned}: not a base "
                                 "model and its fine-tune")
            W_old = old[key] if kind == "linear" else old[key].t()
            if W_new.equal(W_old):
                report.unchanged += 1
                continue
            B, A, err = lowrank_update(W_new, W_old, rank, energy)
            dtype = W_new.dtype if W_new.is_floating_point() else torch.float32
            modules[mod] = {"structure": "lowrank", "layer": kind, "out_features": B.shape[0],
                            "in_features": A.shape[1], "r": int(A.shape[0]), "scale": 1.0}
            tensors[mod] = {"A": A.to(dtype), "B": B.to(dtype)}
            report.ranks[mod], report.errors[mod] = int(A.shape[0]), err
    if not modules:
        raise ValueError(f"{tuned} does not differ from {base} in any selected weight matrix: nothing to extract")
    config = Extracted(targets=sorted(report.ranks), base=str(base), tuned=str(tuned), rank=rank, energy=energy)
    record = AdapterRecord(name, config.to_dict(), modules, tensors, base_model=str(base), task_type=task_type)
    return record, report
