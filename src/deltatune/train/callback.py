"""Drive deltatune controllers from a Hugging Face ``transformers.Trainer``::

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[DeltatuneCallback()])

``Trainer`` clips gradients, then calls ``on_pre_optimizer_step``, ``optimizer.step()`` and ``on_optimizer_step``
once per optimizer step (after all gradient-accumulation micro-batches), which map one to one onto
:func:`deltatune.after_backward` and :func:`deltatune.step`: the same order as :func:`deltatune.train.train`.
``on_train_begin`` calls :func:`deltatune.begin` with ``max_steps``, so schedules need no ``total_step``. Under
distributed training the ``Trainer`` owns the DDP wrapper and cannot rebuild it, so controllers keep shapes
fixed there (pruned components are masked rather than removed; IncreLoRA, which must grow, refuses).

This module imports ``transformers``; ``deltatune.train`` only imports it when ``DeltatuneCallback`` is used.
"""
from __future__ import annotations

from transformers import TrainerCallback

from .. import model as M


class DeltatuneCallback(TrainerCallback):
    """Calls the active adapters' controllers at the right points of each optimizer step."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        M.begin(model, state.max_steps or None, resizable=args.world_size <= 1, step=state.global_step)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        M.after_backward(model, optimizer)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        M.step(model, optimizer)


__all__ = ["DeltatuneCallback"]
