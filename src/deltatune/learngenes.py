"""What a KIND model is for (:mod:`deltatune.methods.kind`): learngene transfer to new classes, recombination into
a smaller model, and fixing one gate for merging and export.

    dt.attach(unet, dt.KIND(n_classes=10, n_tailors=4), name="kind")   # the gate reads unet(..., class_labels=y)
    ...train on the seen classes...
    dt.kind_transfer(unet, n_classes=4)          # learngenes kept (frozen), fresh tailors for 4 new classes
    ...train the tailors on the new classes...
    dt.kind_select(unet, 2); dt.merge(unet)      # the plain weights of class 2
    dt.kind_select(unet, "learngenes"); dt.save(unet, "lg", format="peft")   # the learngene part as a PEFT LoRA
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .deltas.kind import LEARNGENES, KindDelta
from .methods.kind import KIND, class_groups, transferred, recombined
from .registry import adapted_layers, registry, sync

LEARNGENE_MODES = ("frozen", "trainable")


def kind_adapter(model: nn.Module, name: str | None) -> str:
    """``name``, or the model's only KIND adapter; ``ValueError`` when that is not one."""
    reg = registry(model)
    kinds = [n for n, info in reg.adapters.items() if isinstance(info.method, KIND)]
    if name is None:
        if len(kinds) != 1:
            raise ValueError(f"this model has {len(kinds)} KIND adapters ({kinds}); name the one with name=")
        return kinds[0]
    if name not in kinds:
        raise ValueError(f"{name!r} is not a KIND adapter of this model (KIND adapters: {kinds})")
    return name


def _layers(model: nn.Module, name: str):
    return [(mod, layer) for mod, layer in adapted_layers(model) if name in layer.deltas and isinstance(layer.deltas[name], KindDelta)]


def _replace(model: nn.Module, name: str, new: dict[str, KindDelta], method: KIND) -> None:
    layers = dict(_layers(model, name))
    merged = [mod for mod, layer in layers.items() if name in layer.merged]
    if merged:
        raise ValueError(f"KIND adapter {name!r} is merged into {merged[0]}; dt.unmerge(model) first")
    for mod, delta in new.items():
        layer = layers[mod]
        del layer.deltas[name]
        layer.add(name, delta)
    reg = registry(model)
    reg.adapters[name].method = method
    reg.extras.pop("conditioning", None)
    sync(model)


def kind_select(model: nn.Module, which: int | str | None, name: str | None = None) -> nn.Module:
    """Fix the gate of every sample: class ``which``, ``"learngenes"`` (every tailor off), or ``None`` (back to the
    per-sample gate from each batch). With a fixed gate the adapter is one ordinary update: ``dt.merge`` writes that
    class's weights exactly, ``dt.save(..., format="peft")`` exports it as a LoRA, ``dt.combine`` sums it."""
    name = kind_adapter(model, name)
    for _, layer in _layers(model, name):
        layer.deltas[name].select(which)
        layer.generation += 1  # cached serving plans of this layer are stale
    return model


def kind_transfer(model: nn.Module, n_classes: int, n_tailors: int | None = None, n_groups: int | None = None,
                  groups: list[int] | None = None, null_class: int | None = None,
                  learngenes: str = "frozen", sigma: float = 0.0, seed: int = 0, name: str | None = None) -> nn.Module:
    """Learngene transfer (in place): every KIND layer keeps its learngenes (``learngenes="frozen"``: as buffers, so
    only the tailors train; ``"trainable"``: they train too) and its anchor, exactly, and gets fresh tailors for
    ``n_classes`` new classes: ``n_tailors`` per group (default: as before), in random orthonormal directions
    orthogonal to the learngenes, with ``sigma`` (default 0: every new class starts from the learngene-only model).
    Build the optimizer after this call (the tailors are new parameters)."""
    if learngenes not in LEARNGENE_MODES:
        raise ValueError(f"learngenes must be one of {LEARNGENE_MODES}, got {learngenes!r}")
    name = kind_adapter(model, name)
    method = registry(model).adapters[name].method
    method = dataclasses.replace(method, n_classes=n_classes, n_tailors=n_tailors or method.n_tailors,
                                 n_groups=n_groups, class_groups=groups, null_class=null_class)
    method.validate()
    table = class_groups(method.n_classes, method.groups, method.class_groups, method.null_class)
    gen = torch.Generator().manual_seed(seed)
    new = {mod: transferred(layer.deltas[name], table, method.groups, method.n_tailors, learngenes == "frozen",
                            gen, sigma=sigma, soft_init=method.soft_init)
           for mod, layer in _layers(model, name)}
    _replace(model, name, new, method)
    return model


def kind_recombine(model: nn.Module, classes: list[int], name: str | None = None) -> nn.Module:
    """Keep the learngenes and the tailors of ``classes`` only (in place): a smaller model with fewer components
    (and fewer multiply-adds) that still generates those classes exactly as before; the other classes are refused
    afterwards."""
    name = kind_adapter(model, name)
    layers = _layers(model, name)
    if not layers:
        raise ValueError(f"KIND adapter {name!r} has no layers")
    first = layers[0][1].deltas[name]
    first.check_condition(torch.as_tensor(list(classes)))
    keep = sorted({int(first.groups[c]) for c in classes if int(first.groups[c]) >= 0})
    if not keep:
        raise ValueError(f"classes {list(classes)} use no tailors (learngene-only classes); keep at least one class "
                         "with its own tailors")
    new = {mod: recombined(layer.deltas[name], keep) for mod, layer in layers}
    method = registry(model).adapters[name].method
    table = new[layers[0][0]].groups.tolist()
    method = dataclasses.replace(method, n_groups=len(keep), class_groups=table)
    _replace(model, name, new, method)
    return model


__all__ = ["LEARNGENES", "kind_recombine", "kind_select", "kind_transfer"]
