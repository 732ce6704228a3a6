"""Drive deltatune controllers from a Hugging Face ``transformers.Trainer``, and make its checkpoints adapters::

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[DeltatuneCallback()])

``Trainer`` clips gradients, then calls ``on_pre_optimizer_step``, ``optimizer.step()`` and ``on_optimizer_step``
once per optimizer step (after all gradient-accumulation micro-batches), which map one to one onto
:func:`deltatune.after_backward` and :func:`deltatune.step`: the same order as :func:`deltatune.train.train`.
``on_train_begin`` calls :func:`deltatune.begin` with ``max_steps``, so schedules need no ``total_step``. Under
distributed training the ``Trainer`` owns the DDP wrapper and cannot rebuild it, so controllers keep shapes
fixed there (pruned components are masked rather than removed; IncreLoRA, which must grow, refuses).

Checkpoints: the Trainer's ``save_pretrained`` call writes the adapters into ``checkpoint-N/`` (see
:func:`deltatune.hf.save_pretrained`: PEFT's format when they are LoRAs, so ``from_pretrained`` of the folder
gives the trained model); ``on_save`` adds ``checkpoint-N/deltatune/`` (:func:`deltatune.save`: any structure,
with the controllers' state) and a ``model.safetensors`` that holds no tensors, only a note that the checkpoint
stores no base weights: the Trainer needs a weights file to resume or to ``load_best_model_at_end`` a model that
is not a ``PeftModel`` (it then reports every base weight as missing, which is what it is). On
``trainer.train(resume_from_checkpoint=...)``, ``on_train_begin`` loads the adapters of
``<that checkpoint>/deltatune`` back (checked to be the checkpoint the Trainer resumed from)
with the optimizer following them, then calls ``dt.begin`` at the resumed step; with ``load_best_model_at_end``,
``on_train_end`` loads the best checkpoint's adapters.

This module imports ``transformers``; ``deltatune.train`` only imports it when ``DeltatuneCallback`` is used.
"""
from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

from safetensors import safe_open
from transformers import Trainer, TrainerCallback

from .. import model as M
from .. import control as C
from ..hf import restore
from ..io import save
from ..files import write_tensors

ADAPTER_SUBDIR = "deltatune"
WEIGHTS_FILE = "model.safetensors"
STATE_NAME = "trainer_state.json"
NOTE = ("an adapter checkpoint: no base weights are stored here. The adapters are in adapter_model.safetensors "
        "(from_pretrained of this folder loads them onto their base model when they are PEFT LoRAs) and in "
        "deltatune/ (dt.load(model, 'deltatune'))")


def checkpoint_dir(args, state) -> Path:
    """The folder the Trainer writes (and resumes) checkpoint ``state.global_step`` in."""
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


def write_checkpoint(model, folder: Path) -> None:
    """The adapters with their controller state in ``folder/deltatune``; a weights file with no tensors for the
    Trainer to read (unless it wrote one itself: a model that is not a ``PreTrainedModel``)."""
    save(model, folder / ADAPTER_SUBDIR)
    if not (folder / WEIGHTS_FILE).exists():
        write_tensors(folder / WEIGHTS_FILE, {}, metadata={"format": "pt", "deltatune": NOTE})


def _holds_tensors(path: Path) -> bool:
    """Whether the safetensors file ``path`` exists and holds at least one tensor."""
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as f:
        return bool(list(f.keys()))


def resumed_from() -> Path | None:
    """The checkpoint folder the running ``Trainer.train(resume_from_checkpoint=...)`` resumed from, read from the
    Trainer's frame on the call stack (the Trainer does not pass it to callbacks); ``None`` if not found."""
    frame = inspect.currentframe()
    while frame is not None:
        loc = frame.f_locals
        if isinstance(loc.get("self"), Trainer) and isinstance(loc.get("resume_from_checkpoint"), (str, Path)):
            return Path(loc["resume_from_checkpoint"])
        frame = frame.f_back
    return None


def adapter_checkpoint(args, state, folder: str | Path | None = None) -> Path | None:
    """The adapter folder of the checkpoint the Trainer resumed from: ``folder`` if given, else the folder given
    to ``trainer.train(resume_from_checkpoint=...)`` (see :func:`resumed_from`), else
    ``output_dir/checkpoint-<global_step>``; its ``trainer_state.json`` must match the resumed state. ``None`` for a
    full-model checkpoint (written without this callback), which the Trainer has loaded itself."""
    ckpt = Path(folder) if folder is not None else resumed_from() or checkpoint_dir(args, state)
    hint = "pass the checkpoint folder as DeltatuneCallback(resume_from=...)"
    saved = ckpt / STATE_NAME
    if folder is None:
        if not saved.is_file():
            raise FileNotFoundError(f"DeltatuneCallback: the Trainer resumed at step {state.global_step}, but {saved} "
                                    f"does not exist; {hint}")
        mine = json.loads(saved.read_text())
        same_log = json.dumps(mine.get("log_history"), sort_keys=True) == json.dumps(state.log_history, sort_keys=True)
        if mine.get("global_step") != state.global_step or not same_log:  # (as JSON text: a logged NaN equals NaN)
            raise ValueError(f"DeltatuneCallback: {ckpt} is not the checkpoint the Trainer resumed from (its "
                             f"{STATE_NAME} differs); {hint}")
    for cand in (ckpt / ADAPTER_SUBDIR, ckpt):
        if cand.is_dir() and any((p / "adapter_config.json").is_file() for p in (cand, *cand.iterdir())):
            return cand
    if _holds_tensors(ckpt / WEIGHTS_FILE):
        return None
    raise FileNotFoundError(f"DeltatuneCallback: {ckpt} holds no adapter (was it saved without DeltatuneCallback?); "
                            "the adapters would restart from scratch")


class DeltatuneCallback(TrainerCallback):
    """Calls the active adapters' controllers at the right points of each optimizer step; writes the adapters into
    every checkpoint and loads them back when training resumes. ``resume_from``: the checkpoint folder to restore
    from on resume (default: the folder given to ``trainer.train(resume_from_checkpoint=...)``)."""

    def __init__(self, resume_from: str | Path | None = None):
        self.resume_from = resume_from

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step > 0:  # the Trainer resumed from a checkpoint
            folder = adapter_checkpoint(args, state, self.resume_from)
            if folder is not None:
                names = restore(model, folder, optimizer, distributed=args.world_size > 1)
                logging.getLogger("deltatune").warning(
                    "DeltatuneCallback: restored adapters %s from %s (the Trainer reports the base weights as "
                    "missing from the checkpoint: they are the model's own)", names, folder)
        C.begin(model, state.max_steps or None, resizable=args.world_size <= 1, step=state.global_step)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        C.after_backward(model, optimizer)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        C.step(model, optimizer)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best is not None:  # the Trainer loaded no weights from it
            folder = adapter_checkpoint(args, state, best)
            if folder is not None:
                restore(model, folder, distributed=args.world_size > 1)

    def on_save(self, args, state, control, model=None, **kwargs):
        if args.should_save and M.adapters(model):
            write_checkpoint(model, checkpoint_dir(args, state))


__all__ = ["DeltatuneCallback"]
