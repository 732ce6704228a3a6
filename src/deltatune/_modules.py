"""Modules that can also be called: ``dt.combine(model, ...)`` and ``dt.combine.ties`` both work.

The package re-exports a function under the name of a module (``combine``, ``compress``, ``extract``,
``interference``, and ``deltas``, whose function lives in :mod:`deltatune.model`). A plain re-export would replace the
module attribute with the function, so ``deltatune.combine.ties`` and ``import deltatune.combine.ops`` would break.
Instead the module object itself becomes callable: :func:`callable_module` swaps its class for
:class:`CallableModule`, whose ``__call__`` forwards to the function the module names.
"""
from __future__ import annotations

import importlib
import sys
import types


class CallableModule(types.ModuleType):
    """A module whose call ``module(*args, **kwargs)`` is ``target(*args, **kwargs)``, ``target`` being the function
    named by the module's ``__call_target__`` (``"module.path:function"``, imported on the first call, so a target in
    a module that imports this one is no import cycle)."""

    def _target(self):
        path, _, attr = self.__call_target__.partition(":")
        return getattr(importlib.import_module(path), attr)

    def __call__(self, *args, **kwargs):
        return self._target()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<callable module {self.__name__!r}: calls {self.__call_target__}>"


def callable_module(name: str, target: str) -> None:
    """Make module ``name`` (already in ``sys.modules``, e.g. ``__name__``) callable as ``target``
    (``"module.path:function"``); its docstring then also shows the function's."""
    module = sys.modules[name]
    module.__call_target__ = target
    module.__class__ = CallableModule


__all__ = ["CallableModule", "callable_module"]
