"""Which modules to adapt.

A *target spec* is one of

- ``"all-linear"``: every ``nn.Linear`` and GPT-2 ``Conv1D`` except the output head (the model's output
  embeddings and the usual classification heads ``classifier``, ``score``, ``qa_outputs``, ``lm_head``);
- ``"all-conv"``: every ``nn.Conv1d/2d/3d``; ``"all"``: both (the output head left alone);
- a string: a regular expression that must match the *whole* module name (``r".*\\.(query|value)"``);
- a list of names or suffixes: a module matches when its name equals an entry or ends with ``"." + entry``
  (``["query", "value"]``, ``["layers.0.mlp.up_proj"]``).

``exclude`` takes the same forms. Structured methods also need the *units* of a transformer block (heads and
FFN channels, and how they couple across q/k/v/o and gate/up/down): see :class:`UnitMap` and :func:`find_blocks`.

Pattern dictionaries (per-module rank or alpha overrides, ours and those read from PEFT checkpoints) use PEFT's rule
per key: a key made only of letters, digits, ``_``, ``-`` and ``.`` is a literal module name or dotted suffix; any
other key is a regular expression ``R`` that matches when ``(.*\\.)?R`` matches the whole name.

Regular expressions come from users and from checkpoints, so they never run unbounded: they run in the
third-party :mod:`regex` engine with a time limit (:data:`REGEX_BUDGET` CPU seconds per module name), and a
pattern that backtracks catastrophically (``(.|\\w)+\\d{2}``) raises ``ValueError`` naming it instead of hanging.
``layers`` restricts targets to transformer layer indices (PEFT's ``layers_to_transform``): see :func:`layer_index`.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import regex
import torch
from torch import nn

from .layers import adaptable, find_kind, linear_weight, refusal, titles

HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")

TargetSpec = str | Sequence[str] | None


#: the layer families each keyword selects (see :class:`deltatune.layers.LayerKind`)
FAMILIES = {"all-linear": ("linear",), "all-conv": ("conv",), "all": ("linear", "conv")}


def family(module: nn.Module) -> str | None:
    kind = find_kind(module)
    return kind.family if kind is not None else None


def _and(words: list[str]) -> str:
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else "".join(words)


#: CPU seconds one regular expression may take on one module name (a sane one takes microseconds; the first name
#: that exceeds it raises)
REGEX_BUDGET = 0.05
_LITERAL = re.compile(r"[\w.\-]+")


def is_literal(key: str) -> bool:
    """True when ``key`` is a plain (dotted) module name, matched as a name or suffix and never run as a regex."""
    return _LITERAL.fullmatch(key) is not None


def _suffix(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


@functools.lru_cache(maxsize=256)
def _compile(pattern: str, what: str):
    try:
        return regex.compile(pattern)
    except (regex.error, re.error) as e:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {e}") from e


class BoundedRegex:
    """``fullmatch`` of one regular expression, at most ``budget`` CPU seconds per name (:data:`REGEX_BUDGET`).

    A pattern that takes longer (catastrophic backtracking, e.g. nested or overlapping quantifiers) raises
    ``ValueError`` naming ``what`` and the pattern; Python's :mod:`re` cannot be interrupted, :mod:`regex` can."""

    def __init__(self, pattern: str, what: str = "pattern", budget: float | None = None, shown: str | None = None):
        self.pattern, self.what, self.shown = pattern, what, shown or pattern
        self.compiled = _compile(pattern, what)
        self.budget = REGEX_BUDGET if budget is None else budget

    def __call__(self, name: str) -> bool:
        try:
            return self.compiled.fullmatch(name, timeout=self.budget) is not None
        except TimeoutError:
            raise ValueError(
                f"{self.what} {self.shown!r} did not finish matching module name {name!r} within {self.budget}s "
                "(catastrophic backtracking: nested or overlapping repetition such as '(a+)+' or '(.|\\w)+'); give "
                "module-name suffixes (['query', 'value']) or a simpler regex") from None


def pattern_matcher(key: str, what: str = "pattern key"):
    """``match(name) -> bool`` for one pattern-dictionary key (PEFT's rule, see the module docstring)."""
    if is_literal(key):
        return lambda name: _suffix(name, key)
    bounded = BoundedRegex(rf"(?:.*\.)?(?:{key})", what, shown=key)
    return lambda name: _suffix(name, key) or bounded(name)


def name_matches(name: str, key: str) -> bool:
    """PEFT's pattern-key rule: a literal module name or dotted suffix, or else ``(.*\\.)?key`` as a (bounded)
    regular expression matching the whole name; an invalid regex matches nothing."""
    try:
        return pattern_matcher(key)(name)
    except ValueError as e:
        if "not a valid regular expression" in str(e):
            return False
        raise


def spec_matcher(spec: TargetSpec, what: str = "targets"):
    """``match(name) -> bool`` for a target spec: a string is a (bounded) regex matching the whole name; a list
    holds names or dotted suffixes; ``None`` matches nothing."""
    if spec is None:
        return lambda name: False
    if isinstance(spec, str):
        return BoundedRegex(spec, f"{what} pattern")
    items = [s for s in spec]
    return lambda name: any(_suffix(name, s) for s in items)


def layer_index(name: str) -> int | None:
    """The transformer layer a module belongs to: the last all-digit dotted component before the module's own
    name (``bert.encoder.layer.3.attention.self.query`` -> 3, ``model.layers.11.mlp.up_proj`` -> 11), as PEFT's
    ``layers_to_transform`` reads it; ``None`` outside numbered layers (embeddings, heads)."""
    parts = name.split(".")[:-1]
    digits = [int(p) for p in parts if p.isdigit()]
    return digits[-1] if digits else None


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
    accept: Callable[[nn.Module], bool] = adaptable,
    skip: Iterable[str] = (),
    layers: Iterable[int] | int | None = None,
) -> list[str]:
    """Module names selected by ``targets`` minus ``exclude``, restricted to the layer indices ``layers`` when given
    (see :func:`layer_index`). Errors say what is close when nothing matches."""
    skip = set(skip)
    named = [(n, m) for n, m in model.named_modules() if n and n not in skip]
    if isinstance(targets, str) and targets in FAMILIES:
        heads = head_names(model)
        selected = [n for n, m in named if family(m) in FAMILIES[targets] and n not in heads]
    else:
        if not isinstance(targets, str) and not targets:
            raise ValueError("no targets given: pass 'all-linear', a regex, or a list of module-name suffixes")
        match = spec_matcher(targets, "target")
        selected = [n for n, m in named if match(n)]
        wrong = [n for n in selected if not accept(dict(named)[n])]
        if wrong:
            raise ValueError(_refused_message(targets, [(n, dict(named)[n]) for n in wrong]))
        if not isinstance(targets, str):
            missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in selected)]
            if missing:
                raise ValueError(_unknown_message(missing[0], named, accept))
    excluded = spec_matcher(exclude, "exclude")
    selected = [n for n in selected if not excluded(n)]
    if layers is not None:
        wanted = {layers} if isinstance(layers, int) else set(layers)
        kept = [n for n in selected if layer_index(n) in wanted]
        if not kept:
            found = sorted({i for i in map(layer_index, selected) if i is not None})
            raise ValueError(f"layers={sorted(wanted)} keeps none of the {len(selected)} targeted modules; their layer "
                             f"indices are {found}")
        selected = kept
    if not selected:
        raise ValueError(_unknown_message(targets if isinstance(targets, str) else str(list(targets)), named,
                                          accept, excluded=exclude))
    return selected


def _refused_message(targets: TargetSpec, wrong: list[tuple[str, nn.Module]]) -> str:
    """Why ``targets`` cannot be adapted: a refused module type (a transposed conv) with its reason, else the
    module types found and the adaptable ones."""
    refused = [(n, m, why) for n, m in wrong if (why := refusal(m)) is not None]
    if refused:
        n, m, why = refused[0]
        return (f"targets {targets!r} select module {n!r}, and deltatune cannot adapt {type(m).__name__}: {why}"
                + (f" ({len(wrong) - 1} more unadaptable modules selected)" if len(wrong) > 1 else ""))
    kinds_found = sorted({type(m).__name__ for _, m in wrong})
    return (f"targets {targets!r} select modules deltatune cannot adapt ({', '.join(kinds_found)}), e.g. "
            f"{wrong[0][0]!r}; adaptable layers are {_and(titles())}. Narrow the pattern to leaf layers.")


def _unknown_message(target: str, named, accept, excluded=None) -> str:
    names = [n for n, m in named if accept(m)]
    suffixes = sorted({n.split(".")[-1] for n in names})
    close = difflib.get_close_matches(str(target).split(".")[-1], suffixes + names, n=5, cutoff=0.4)
    hint = f"close names: {', '.join(close)}" if close else f"adaptable layer names end in: {', '.join(suffixes[:20])}"
    extra = f" after exclude={excluded!r}" if excluded else ""
    return f"target {target!r} matches no adaptable module{extra}; {hint}"


def pattern_value(name: str, patterns: dict | None, default, what: str = "pattern key"):
    """The value of the first key in ``patterns`` that matches ``name`` (PEFT's rule, see :func:`pattern_matcher`),
    else ``default``. Regex keys run bounded (a hostile key raises ``ValueError`` naming ``what``)."""
    for key, value in (patterns or {}).items():
        if pattern_matcher(str(key), what)(name):
            return value
    return default


# -- unit maps: how heads and FFN channels couple across the layers of one transformer block --------------------
#
# A block's *units* are what structured methods (S2FT) select. Attention: a query head ``h`` owns rows
# ``h*hd:(h+1)*hd`` of ``q`` and the same columns of ``o``; under grouped-query attention it reads key/value head
# ``g = h // (H / H_kv)``, whose rows ``g*hd:(g+1)*hd`` of ``k`` and ``v`` are shared by the ``H / H_kv`` query heads
# of its group. FFN: channel ``j`` owns row ``j`` of ``up`` (and of ``gate`` in gated FFNs) and column ``j`` of
# ``down``. A new architecture is one :data:`UNIT_MAPS` entry: the block-relative names of its projections, under
# the key :func:`architecture` reads from the model.


@dataclass(frozen=True)
class UnitMap:
    """Block-relative names of one architecture's projections (``gate`` only for gated FFNs)."""

    q: str
    k: str
    v: str
    o: str
    up: str
    down: str
    gate: str | None = None

    def roles(self) -> dict[str, str]:
        return {r: n for r, n in dataclasses.asdict(self).items() if n is not None}


_LLAMA = UnitMap(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
                 gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj")
_BERT = UnitMap(q="attention.self.query", k="attention.self.key", v="attention.self.value",
                o="attention.output.dense", up="intermediate.dense", down="output.dense")
#: diffusers' ``BasicTransformerBlock`` (DiT): self-attention ``attn1`` and a non-gated feed-forward ``ff`` (``ff.net.0``
#: is the activation module holding the up projection ``proj``; ``ff.net.2`` the down projection)
_DIT = UnitMap(q="attn1.to_q", k="attn1.to_k", v="attn1.to_v", o="attn1.to_out.0", up="ff.net.0.proj",
               down="ff.net.2")
#: :func:`architecture` (transformers' ``config.model_type``, else the model's class name) -> unit map
UNIT_MAPS: dict[str, UnitMap] = {
    **{t: _LLAMA for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "granite")},
    **{t: _BERT for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
    **{t: _DIT for t in ("DiTTransformer2DModel", "Transformer2DModel")},
}


def architecture(model: nn.Module) -> str:
    """The :data:`UNIT_MAPS` key of ``model``: transformers' ``config.model_type``, or the class name for models whose
    config has none (diffusers: ``DiTTransformer2DModel``)."""
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


@dataclass
class Block:
    """One transformer block: full module names per role and the head / channel geometry."""

    index: int
    names: dict[str, str]
    heads: int
    kv_heads: int
    head_dim: int
    channels: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.heads // self.kv_heads

    def kv_group(self, head: int) -> int:
        """The key/value head that query head ``head`` reads."""
        return head // self.group_size

    def units(self, role: str) -> int:
        """How many units a role's weight is cut into: query heads (q, o), KV heads (k, v), channels (FFN)."""
        return {"q": self.heads, "o": self.heads, "k": self.kv_heads, "v": self.kv_heads}.get(role, self.channels)

    def unit_width(self, role: str) -> int:
        return self.head_dim if role in ("q", "k", "v", "o") else 1

    def indices(self, role: str, units) -> torch.Tensor:
        """Rows (q, k, v, gate, up) or columns (o, down) of ``role``'s weight that belong to ``units``."""
        units = torch.as_tensor(list(units), dtype=torch.long).reshape(-1)
        w = self.unit_width(role)
        return (units[:, None] * w + torch.arange(w)).reshape(-1)

    def coupled(self, kind: str, unit: int) -> dict[str, tuple[int, torch.Tensor]]:
        """``{role: (axis, indices)}`` of everything that moves with one unit: ``kind="head"`` (a query head and its
        KV group's k/v rows), ``"kv"`` (a KV head with all its query heads) or ``"channel"`` (an FFN channel)."""
        if kind == "channel":
            out = {"up": (0, self.indices("up", [unit])), "down": (1, self.indices("down", [unit]))}
            if "gate" in self.names:
                out["gate"] = (0, self.indices("gate", [unit]))
            return out
        if kind == "head":
            heads, group = [unit], self.kv_group(unit)
        elif kind == "kv":
            heads, group = range(unit * self.group_size, (unit + 1) * self.group_size), unit
        else:
            raise ValueError(f"unit kind must be 'head', 'kv' or 'channel', got {kind!r}")
        return {"q": (0, self.indices("q", heads)), "k": (0, self.indices("k", [group])),
                "v": (0, self.indices("v", [group])), "o": (1, self.indices("o", heads))}


def _config_int(config, *names):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return int(v)
    return None


def find_blocks(model: nn.Module, unit_map: UnitMap | None = None, modules: dict | None = None) -> list[Block]:
    """The transformer blocks of ``model`` in layer order, found by the architecture's :data:`UNIT_MAPS` entry
    (or ``unit_map``); head counts come from ``model.config``. ``modules``: ``{name: module}`` to search instead
    of ``model.named_modules()`` (used to look past adapter wrappers)."""
    config = getattr(model, "config", None)
    if unit_map is None:
        model_type = architecture(model)
        if model_type not in UNIT_MAPS:
            raise ValueError(f"no unit map for model type {model_type!r} (known: {sorted(UNIT_MAPS)}); pass "
                             "unit_map=deltatune.targets.UnitMap(q=..., k=..., v=..., o=..., up=..., down=...) with "
                             "the block-relative names of the projections")
        unit_map = UNIT_MAPS[model_type]
    heads = _config_int(config, "num_attention_heads", "n_head")
    if heads is None:
        raise ValueError("the model has no config.num_attention_heads; structured units need the head count")
    kv_heads = _config_int(config, "num_key_value_heads") or heads
    modules = dict(model.named_modules()) if modules is None else modules
    roles = unit_map.roles()
    blocks = []
    for name in modules:
        if not name.endswith("." + unit_map.v):
            continue
        prefix = name[: -len(unit_map.v) - 1]
        names = {r: f"{prefix}.{rel}" for r, rel in roles.items()}
        missing = [n for n in names.values() if n not in modules]
        if missing:
            raise ValueError(f"block {prefix!r} has no module {missing[0]!r}; fix the unit map")
        head_dim = _config_int(config, "head_dim", "attention_head_dim") or _out(modules[names["q"]]) // heads
        if head_dim * heads != _out(modules[names["q"]]) or head_dim * kv_heads != _out(modules[names["v"]]):
            raise ValueError(f"block {prefix!r}: q/v output sizes do not match {heads} heads, {kv_heads} KV heads of "
                             f"dimension {head_dim}")
        channels = _out(modules[names["up"]])
        if _in(modules[names["down"]]) != channels:  # e.g. a gated FFN whose up projection packs gate and up rows
            raise ValueError(f"block {prefix!r}: {names['up']!r} has {channels} outputs but {names['down']!r} "
                             f"{_in(modules[names['down']])} inputs; FFN channels need one row of up per column of "
                             "down (a packed gate/up projection such as GEGLU has no unit map)")
        digits = [int(p) for p in prefix.split(".") if p.isdigit()]
        blocks.append(Block(digits[-1] if digits else len(blocks), names, heads, kv_heads, head_dim, channels))
    if not blocks:
        raise ValueError(f"no transformer blocks found: no module name ends in {unit_map.v!r}")
    return sorted(blocks, key=lambda b: b.index)


def _out(module: nn.Module) -> int:
    return linear_weight(module).shape[0]


def _in(module: nn.Module) -> int:
    return linear_weight(module).shape[1]
