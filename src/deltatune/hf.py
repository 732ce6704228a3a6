"""Hugging Face clients without subclassing: ``save_pretrained`` of an adapted model, and resuming adapters.

:func:`deltatune.attach` gives a model whose class has ``save_pretrained`` (a transformers ``PreTrainedModel``)
an instance-level ``save_pretrained`` that writes its adapters, as PEFT's does; :func:`deltatune.unload` (or
deleting the last adapter) takes it away again. The ``transformers.Trainer`` and sentence-transformers' ``save``
call it, so their folders hold adapters, not a full model under deltatune's module names that
``from_pretrained`` would load with the adapted layers randomly initialized.

:func:`restore` puts the adapters saved in a training checkpoint back onto a model whose optimizer already exists
(the Trainer builds it before any callback runs on resume).
"""
from __future__ import annotations

import types
from pathlib import Path

import torch
from torch import nn

from . import model as M
from .layers import unwrap
from .registry import ON_CLOSE, ON_CREATE, registry
from .io import NeedsBase, NotLowRank, load, read_record, save
from .files import CONFIG_NAME, adapter_folders, read_json
from .io.record import build_deltas


def save_pretrained(model: nn.Module, save_directory, *args, is_main_process: bool = True, format: str | None = None,
                    **kwargs) -> None:
    """Write the model's adapters (not the base weights) to ``save_directory``.

    Format: PEFT's LoRA format when every adapter is exactly a LoRA (LoRA, AdaLoRA, ... plus full modules such as a
    classification head), so that ``AutoModel*.from_pretrained(save_directory)``, sentence-transformers and PEFT
    load it onto the base model named in its config; otherwise deltatune's own format (``dt.load`` reads it;
    ``from_pretrained`` refuses it with an error). ``format="peft"`` or ``"deltatune"`` forces one. Several
    adapters go to one subfolder each. The other arguments of ``PreTrainedModel.save_pretrained``
    (``state_dict``, ``safe_serialization``, ...) are accepted and ignored: the files are always safetensors.
    """
    if not is_main_process:
        return
    if format is None:
        try:
            save(model, save_directory, format="peft")
            return
        except (NotLowRank, NeedsBase):
            format = "deltatune"
    save(model, save_directory, format=format)


def saved_names(folder: str | Path) -> list[str]:
    """Names of the adapters saved in ``folder`` (one adapter in the folder itself, or one per subfolder)."""
    return [sub or read_json(Path(f) / CONFIG_NAME).get("name", "default") for sub, f in adapter_folders(folder).items()]


def check_loadable(model: nn.Module, folder: str | Path) -> None:
    """Read and build every adapter in ``folder`` against ``model`` without touching it: a damaged or mismatched
    checkpoint raises here, before the adapters it would replace are deleted."""
    for sub, f in adapter_folders(folder).items():
        build_deltas(model, read_record(f, sub or None, model))


def _follow_optimizer(optimizer, old: dict[str, nn.Parameter], new: dict[str, nn.Parameter]) -> None:
    """Point the optimizer's param groups at the new parameters of the same name and move their state over (the
    state loaded from a checkpoint belongs to the parameters as they were saved, i.e. to the new ones)."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    swap = {id(p): new[k] for k, p in old.items() if k in new and new[k] is not p}
    for group in opt.param_groups:
        group["params"] = [swap.get(id(q), q) for q in group["params"]]
    for p in [p for p in list(opt.state) if id(p) in swap]:
        opt.state[swap[id(p)]] = opt.state.pop(p)


def restore(model: nn.Module, folder: str | Path, optimizer=None, distributed: bool = False) -> list[str]:
    """Replace the model's adapters by those saved in ``folder`` (:func:`deltatune.load`, with their controller
    state) and keep training them: the active / trainable sets stay as they are and ``optimizer`` follows the new
    parameters. Adapters of the model that the folder does not hold are left alone. Returns the restored names.

    ``distributed``: the parameters sit in a DDP wrapper that cannot be rebuilt from here, so they must stay the
    same tensors: values are copied into the old parameters where that is exact (same shapes, no controller that
    keeps per-parameter state); otherwise this raises before changing anything."""

    inner = unwrap(model)
    names = saved_names(folder)
    reg = registry(inner)
    if distributed and any(reg.adapters[n].controller is not None for n in names if n in reg.adapters):
        raise RuntimeError(f"cannot restore adapters with controllers ({names}) from {folder} under a distributed "
                           "Trainer: its DDP wrapper holds the current parameters and cannot be rebuilt from a "
                           "callback. Resume this run in one process, or with deltatune's trainer")
    active, trainable = list(reg.active), reg.trainable
    check_loadable(inner, folder)
    old = dict(inner.named_parameters())
    for n in names:
        if n in M.adapters(inner):
            M.delete(inner, n)
    load(inner, folder, activate=False)
    M.set_active(inner, [n for n in active if n in M.adapters(inner)] or names,
                 None if trainable is None else [n for n in trainable if n in M.adapters(inner)] or None)
    new = dict(inner.named_parameters())
    if distributed:
        _copy_into_old(inner, old, new)
    elif optimizer is not None:
        _follow_optimizer(optimizer, old, new)
    return names


def _copy_into_old(root: nn.Module, old: dict[str, nn.Parameter], new: dict[str, nn.Parameter]) -> None:
    """Give every new parameter's module the old parameter of the same name back, holding the new values."""
    for key, p in new.items():
        q = old.get(key)
        if q is None or q is p:
            continue
        if q.shape != p.shape or q.dtype != p.dtype:
            raise RuntimeError(f"cannot restore {key} in place under a distributed Trainer: the checkpoint holds shape "
                               f"{tuple(p.shape)}, the model {tuple(q.shape)}")
        mod_name, _, pname = key.rpartition(".")
        with torch.no_grad():
            q.copy_(p)
        q.requires_grad_(p.requires_grad)
        root.get_submodule(mod_name)._parameters[pname] = q


__all__ = ["restore", "save_pretrained", "saved_names"]


# -- registered with the registry: an adapted transformers model saves its adapters -------------------------------
def _give_save_pretrained(model: nn.Module, reg) -> None:
    """An instance method: ``model.save_pretrained`` (and the HF Trainer's checkpoints) write the adapters."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.__dict__["save_pretrained"] = types.MethodType(save_pretrained, model)


def _take_save_pretrained(model: nn.Module, reg) -> None:
    if getattr(model.__dict__.get("save_pretrained"), "__func__", None) is save_pretrained:
        del model.__dict__["save_pretrained"]


ON_CREATE.append(_give_save_pretrained)
ON_CLOSE.append(_take_save_pretrained)
