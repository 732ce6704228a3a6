"""Drive deltatune controllers from a Hugging Face ``transformers.Trainer``::

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[DeltatuneCallback()])

``Trainer`` clips gradients, then calls ``on_pre_optimizer_step``, ``optimizer.step()`` and ``on_optimizer_step``
once per optimizer step (after all gradient-accumulation micro-batches), which map one to one onto
:func:`deltatune.after_backward` and :func:`deltatune.step`: the same order as :func:`deltatune.train.train`.

This module imports ``transformers``; ``deltatune.train`` only imports it when ``DeltatuneCallback`` is used.
"""
from __future__ import annotations

from transformers import TrainerCallback

from .. import model as M


class DeltatuneCallback(TrainerCallback):
    """Calls the active adapters' controllers at the right points of each optimizer step."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        M.after_backward(model)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        M.step(model, optimizer)


__all__ = ["DeltatuneCallback"]
