"""Which modules to adapt.

A *target spec* is one of

- ``"all-linear"``: every ``nn.Linear`` and GPT-2 ``Conv1D`` except the output head (the model's output
  embeddings and the usual classification heads ``classifier``, ``score``, ``qa_outputs``, ``lm_head``);
- a string: a regular expression that must match the *whole* module name (``r".*\\.(query|value)"``);
- a list of names or suffixes: a module matches when its name equals an entry or ends with ``"." + entry``
  (``["query", "value"]``, ``["layers.0.mlp.up_proj"]``).

``exclude`` takes the same forms. Pattern dictionaries (per-module rank or alpha overrides) use the same rule
per key: suffix match, or else a full regex match.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

from torch import nn

ADAPTABLE = (nn.Linear, nn.Embedding)
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")

TargetSpec = str | Sequence[str] | None


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional
        return None
    return Conv1D


def linear_types() -> tuple[type, ...]:
    conv = _conv1d_type()
    return (nn.Linear,) if conv is None else (nn.Linear, conv)


def name_matches(name: str, key: str) -> bool:
    """Suffix match on dotted components, or else a full regular-expression match."""
    if name == key or name.endswith("." + key):
        return True
    try:
        return re.fullmatch(key, name) is not None
    except re.error:
        return False


def _matches(name: str, spec: TargetSpec) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def head_names(model: nn.Module) -> set[str]:
    """Names of output-head modules that ``"all-linear"`` leaves alone."""
    heads = set()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if (out_emb is not None and module is out_emb) or name.split(".")[-1] in HEAD_NAMES:
            heads.add(name)
    return heads


def resolve_targets(
    model: nn.Module,
    targets: TargetSpec,
    exclude: TargetSpec = None,
    kinds: tuple[type, ...] | None = None,
    skip: Iterable[str] = (),
) -> list[str]:
    """Module names selected by ``targets`` minus ``exclude``. Errors say what is close when nothing matches."""
    skip = set(skip)
    adaptable = kinds or (*linear_types(), nn.Embedding)
    named = [(n, m) for n, m in model.named_modules() if n and n not in skip]
    if targets == "all-linear":
        heads = head_names(model)
        selected = [n for n, m in named if isinstance(m, linear_types()) and n not in heads]
    else:
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as e:
                raise ValueError(f"target pattern {targets!r} is not a valid regular expression: {e}") from e
        elif not targets:
            raise ValueError("no targets given: pass 'all-linear', a regex, or a list of module-name suffixes")
        selected = [n for n, m in named if _matches(n, targets)]
        wrong = [n for n in selected if not isinstance(dict(named)[n], adaptable)]
        if wrong:
            kinds_found = sorted({type(dict(named)[n]).__name__ for n in wrong})
            raise ValueError(
                f"targets {targets!r} select modules deltatune cannot adapt ({', '.join(kinds_found)}), e.g. "
                f"{wrong[0]!r}; adaptable layers are Linear, Conv1D and Embedding. Narrow the pattern to leaf layers."
            )
        if not isinstance(targets, str):
            missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in selected)]
            if missing:
                raise ValueError(_unknown_message(missing[0], named, adaptable))
    selected = [n for n in selected if not _matches(n, exclude)]
    if not selected:
        raise ValueError(_unknown_message(targets if isinstance(targets, str) else str(list(targets)), named,
                                          adaptable, excluded=exclude))
    return selected


def _unknown_message(target: str, named, adaptable, excluded=None) -> str:
    names = [n for n, m in named if isinstance(m, adaptable)]
    suffixes = sorted({n.split(".")[-1] for n in names})
    close = difflib.get_close_matches(str(target).split(".")[-1], suffixes + names, n=5, cutoff=0.4)
    hint = f"close names: {', '.join(close)}" if close else f"adaptable layer names end in: {', '.join(suffixes[:20])}"
    extra = f" after exclude={excluded!r}" if excluded else ""
    return f"target {target!r} matches no adaptable module{extra}; {hint}"


def pattern_value(name: str, patterns: dict | None, default):
    """The value of the first key in ``patterns`` that matches ``name`` (see :func:`name_matches`), else default."""
    for key, value in (patterns or {}).items():
        if name_matches(name, key):
            return value
    return default
