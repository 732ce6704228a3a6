"""LoRA extraction: the low-rank adapter closest to a full fine-tune.

For every weight matrix that changed between a base model ``W`` and its fine-tuned version ``W'``, the update
``dW = W' - W`` (linear layout, out x in) is replaced by its truncated SVD (Eckart-Young: the best rank-``k``
approximation in Frobenius norm)::

    dW = U diag(S) V^T  ~  B A,    B = U_k diag(S_k),  A = V_k^T,  scale 1

with ``k = rank``, or per layer the fewest components holding ``energy`` of ``||dW||_F^2``. The relative error
``||dW - B A||_F / ||dW||_F = sqrt(sum_{i>k} S_i^2 / sum_i S_i^2)`` is reported per layer.

Layer kinds come from the model's ``config.json`` (a transformers or diffusers model, built on the meta device),
so GPT-2's ``Conv1D`` (stored ``in x out``), embedding tables (``dW`` of the transposed table: an embedding LoRA)
and convolutions (``out x in/groups x kernel``, linear layout ``out x (in/groups * prod(kernel))``: the LoRA is a
LoCon, ``A`` a conv with the base's kernel and ``B`` a 1x1 conv) are handled; without a config, tables are
recognized by name and convolutions by their 3-, 4- or 5-D weights. Tensors are streamed from the two safetensors checkpoints one pair at a time
(:class:`deltatune.io.weights.WeightStore`), so peak memory is about one layer's ``W``, ``W'`` and its SVD, whatever
the model size. Modules present only in the fine-tuned model (a new classification head) are kept whole (PEFT's
``modules_to_save``); other changed tensors that are not weight matrices (norms, biases), and resized ones, cannot
be a LoRA and are listed in the report.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .deltas import FullDelta, LowRankDelta
from .layers import GUESSED_KINDS, kind_named, kind_of
from .util import progress
from .io.record import AdapterRecord
from .io.weights import WeightStore
from .methods import Method
from .svd import svd_factors
from .targets import TargetSpec, spec_matcher

#: tensor names of lookup tables (their LoRA is an embedding LoRA, ``dW`` taken on the transposed table)
EMBEDDING = re.compile(r".*(embed|\bwte|\bwpe|\bshared)[^.]*$")


def guess_kind(module: str, ndim: int) -> str:
    """The layer kind of a module without a config: by dimensions, and lookup tables by name (:data:`EMBEDDING`)."""
    return "embedding" if ndim == 2 and EMBEDDING.fullmatch(module) else GUESSED_KINDS[ndim]


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
    resized: list[str] = field(default_factory=list)  # tensors whose shape differs (e.g. a resized vocabulary)
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
        if self.resized:
            lines.append(f"resized, left out (not a LoRA; keep or resize them yourself): {', '.join(self.resized)}")
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


def common_precision(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both tensors in the coarser of their two float dtypes (a float32 base against a bfloat16 fine-tune would
    otherwise show rounding noise as a full-rank update everywhere)."""
    if a.dtype == b.dtype or not (a.is_floating_point() and b.is_floating_point()):
        return a, b
    coarse = max((a.dtype, b.dtype), key=lambda d: torch.finfo(d).eps)
    return a.to(coarse), b.to(coarse)


def _transformers_model(folder: Path):
    import transformers  # optional third-party dependency (the hf extra)

    config = transformers.AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, (config.architectures or [""])[0], None)
    return cls(config) if cls is not None else transformers.AutoModel.from_config(config)


def _diffusers_model(folder: Path, class_name: str):
    import diffusers  # optional third-party dependency (the diffusion extra)

    cls = getattr(diffusers, class_name)
    return cls.from_config(cls.load_config(folder))


def module_kinds(path: str | Path) -> dict[str, str] | None:
    """``{module name: layer kind name}`` (``"linear"``, ``"conv1d"``, ``"embedding"``, ``"nn_conv2d"``, ...) of the
    model whose ``config.json`` sits beside the weights (see :func:`model_layers`); ``None`` without a usable config."""
    layers = model_layers(path)
    return None if layers is None else {n: kind for n, (kind, _) in layers.items()}


def weight_geometry(shape) -> dict:
    """What a stored weight says of its layer beyond the linear layout: a conv's ``kernel`` (its dims after the
    first two; the groups are not in the shape)."""
    return {"kernel": list(shape[2:])} if len(shape) > 2 else {}


def model_layers(path: str | Path) -> dict[str, tuple[str, dict]] | None:
    """``{module name: (layer kind name, geometry)}`` (geometry: what file formats need, a conv's kernel and groups,
    :attr:`deltatune.layers.LayerKind.geometry`) of the model whose ``config.json`` sits beside the weights: a
    transformers model, or a diffusers one (its config names its ``_class_name``), built on the meta device (no
    memory, no weights); ``None`` without a usable config."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if not (folder / "config.json").is_file():
        return None
    try:
        class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
        with torch.device("meta"):
            model = _transformers_model(folder) if class_name is None else _diffusers_model(folder, class_name)
    except Exception as e:  # an architecture this transformers / diffusers does not know: fall back on names
        warnings.warn(f"could not build the model of {folder / 'config.json'} to read its layer kinds ({e}); "
                      "guessing embeddings from tensor names and convolutions from their dimensions", stacklevel=3)
        return None
    layers = {}
    for name, module in model.named_modules():
        try:
            kind = kind_of(module)
        except TypeError:
            continue
        layers[name] = (kind.name, kind.geometry(module))
    return layers


def extract(base: str | Path, tuned: str | Path, rank: int | None = None, energy: float | None = None,
            targets: TargetSpec = None, exclude: TargetSpec = None, name: str = "extracted",
            task_type: str | None = None, kinds: dict[str, str] | None = None) -> tuple[AdapterRecord, ExtractionReport]:
    """The LoRA adapter that best turns ``base`` into ``tuned`` (safetensors files or model folders).

    ``rank``: components per module; ``energy``: instead, per module the fewest components holding this share of
    ``||dW||_F^2`` (both given: the smaller of the two). ``targets`` / ``exclude``: which modules (a list of names
    or suffixes, or a regular expression over the whole module name; default every changed weight matrix).
    ``kinds``: ``{module: "linear" | "conv1d" | "embedding" | "nn_conv2d" | ...}``; by default read from the
    fine-tuned model's ``config.json`` (GPT-2's ``Conv1D`` stores ``in x out``), else guessed (:func:`guess_kind`).
    Tensor names may differ by a prefix between the two checkpoints. Returns the adapter (write it with
    :func:`deltatune.io.write_record`, e.g. in PEFT format) and the report.
    """
    if rank is None and energy is None:
        raise ValueError("give rank= (components per module) or energy= (share of ||dW||^2 to keep, e.g. 0.9)")
    if rank is not None and rank <= 0 or energy is not None and not 0 < energy <= 1:
        raise ValueError(f"rank must be positive and energy in (0, 1], got rank={rank}, energy={energy}")
    layers = model_layers(tuned) if kinds is None else None
    if layers is not None:
        kinds = {n: kind for n, (kind, _) in layers.items()}
    modules, tensors, report = {}, {}, ExtractionReport()
    selected, excluded = spec_matcher(targets), spec_matcher(exclude, "exclude")
    matched = 0
    with WeightStore(base) as old, WeightStore(tuned) as new:
        for key in progress(new.keys(), "extract"):
            mod, _, param = key.rpartition(".")
            if targets is not None and not selected(mod) or excluded(mod):
                continue
            shape, old_key = new.shape(key), old.resolve(mod, param)
            if old_key is not None and old.shape(old_key) != shape:
                report.resized.append(key)
                continue
            if param != "weight" or (kinds is not None and mod not in kinds) or \
                    (kinds is None and len(shape) not in GUESSED_KINDS):
                if old_key is not None and len(shape) and not (new_t := new[key]).equal(old_t := old[old_key]):
                    report.skipped[key] = _relative_change(new_t, old_t)
                continue
            kind = kinds[mod] if kinds is not None else guess_kind(mod, len(shape))
            geometry = layers[mod][1] if layers is not None else weight_geometry(shape)
            W_new = kind_named(kind).to_linear(new[key])
            if old_key is None:  # a module only the fine-tuned model has: keep it whole
                bias = f"{mod}.bias"
                modules[mod] = {**FullDelta.spec_for(*W_new.shape, layer=kind), **geometry}
                tensors[mod] = {"weight": W_new, **({"bias": new[bias]} if bias in new else {})}
                report.kept_whole.append(mod)
                continue
            matched += 1
            W_old = kind_named(kind).to_linear(old[old_key])
            W_new, W_old = common_precision(W_new, W_old)
            if W_new.equal(W_old):
                report.unchanged += 1
                continue
            B, A, err = lowrank_update(W_new, W_old, rank, energy)
            dtype = W_new.dtype if W_new.is_floating_point() else torch.float32
            modules[mod] = {**LowRankDelta.spec_for(B.shape[0], A.shape[1], A.shape[0], 1.0, layer=kind), **geometry}
            tensors[mod] = {"A": A.to(dtype), "B": B.to(dtype)}
            report.ranks[mod], report.errors[mod] = int(A.shape[0]), err
    if not matched and report.kept_whole:
        raise ValueError(f"no weight matrix of {tuned} has a counterpart in {base} (compared "
                         f"{len(report.kept_whole)}): not a base model and its fine-tune")
    if not modules:
        raise ValueError(f"{tuned} does not differ from {base} in any selected weight matrix: nothing to extract")
    config = Extracted(targets=sorted(report.ranks), modules_to_save=report.kept_whole or None, base=str(base),
                       tuned=str(tuned), rank=rank, energy=energy)
    folder = Path(base) if Path(base).is_dir() else Path(base).parent
    record = AdapterRecord(name, config.to_dict(), modules, tensors, base_model=str(folder), task_type=task_type)
    return record, report


from ._modules import callable_module  # noqa: E402

callable_module(__name__, "deltatune.extract:extract")  # dt.extract(...) calls the function
