"""S2FT: structured sparse fine-tuning (Yang et al., NeurIPS'24), "select sparsely, compute densely".

In every transformer block S2FT trains a few *units* densely and leaves the rest frozen (see
:mod:`deltatune.targets` for the unit maps):

====  ==========================================  ========  ==========================
part  trained slice                               type      unit
====  ==========================================  ========  ==========================
v     rows ``g*hd:(g+1)*hd`` of ``v``             row       key/value head ``g``
o     columns ``h*hd:(h+1)*hd`` of ``o``          column    query head ``h``
u     row ``j`` of ``up`` (and ``gate``)          row       FFN channel ``j``
d     column ``j`` of ``down``                    column    FFN channel ``j``
====  ==========================================  ========  ==========================

For each part, ``num = int(L * units * ratio)`` units are chosen, either from the pool of all ``L`` blocks at once
(``allocation="global"``, the paper's code: per-block counts vary) or ``num / L`` per block (``"layer"``). Units are
ranked by a score and the top ones win:

- ``random`` (S2FT-R, the paper's default): uniform scores, i.e. sampling without replacement;
- ``weight``: ``||W_unit||_F``, the norm of the unit's slice of the pretrained weight;
- ``activation``: the norm, over calibration tokens, of the activation the unit carries (``v``'s output rows,
  ``o``'s input columns, the FFN's intermediate channel);
- ``gradient``: the norm of the loss gradient on the unit's slice, summed over calibration batches.

Each selected slice gets a :class:`~deltatune.deltas.SlicedDelta` that starts at zero (the model is unchanged at
init) and trains with partial back-propagation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..budget.sync import broadcast_
from ..layers import base_modules, kind_of
from ..util import progress, run_batch
from ..deltas import SlicedDelta
from ..targets import Block, UnitMap, find_blocks
from .base import Method, adapter_dtype

#: part -> (role in the unit map, axis of the trained slice: 0 rows, 1 columns)
PARTS = {"v": ("v", 0), "o": ("o", 1), "u": ("up", 0), "d": ("down", 1)}
SELECTIONS = ("random", "weight", "activation", "gradient")


# -- pure tensor math -------------------------------------------------------------------------------------------
def _linear(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``t`` (a weight or its gradient) in linear layout (out x in), as the module's layer kind stores it."""
    return kind_of(module).to_linear(t)


def unit_norms_sq(W: torch.Tensor, axis: int, units: int) -> torch.Tensor:
    """Squared Frobenius norm of each of ``units`` equal slices of ``W`` along ``axis`` (rows 0, columns 1)."""
    W = W.detach().float()
    if axis == 0:
        return W.reshape(units, -1).pow(2).sum(1)
    return W.reshape(W.shape[0], units, -1).pow(2).sum((0, 2))


def per_layer_counts(num: int, layers: int) -> list[int]:
    """``num`` split as evenly as possible over ``layers`` (the first ones take the remainder)."""
    return [num // layers + (i < num % layers) for i in range(layers)]


def select_units(scores: torch.Tensor, num: int, allocation: str) -> list[list[int]]:
    """For scores (layers x units), the ``num`` best units: over all layers at once (``"global"``) or the same
    number per layer (``"layer"``). Returns the sorted unit indices of each layer."""
    L, n = scores.shape
    if allocation == "global":
        flat = torch.topk(scores.reshape(-1), num).indices
        chosen = [sorted((flat[flat // n == i] % n).tolist()) for i in range(L)]
    else:
        chosen = [sorted(torch.topk(scores[i], c).indices.tolist()) for i, c in enumerate(per_layer_counts(num, L))]
    return chosen


# -- calibration ---------------------------------------------------------------------------------------------------
def _loss(out) -> torch.Tensor:
    loss = getattr(out, "loss", None) if not isinstance(out, dict) else out.get("loss")
    if loss is None:
        raise ValueError("gradient-based selection needs a loss: give calibration batches with labels so that the "
                         "model returns .loss")
    return loss


def activation_scores(model, blocks: list[Block], modules: dict[str, nn.Module], parts, data) -> dict:
    """``{part: (layers x units)}`` squared activation norms summed over the calibration tokens."""
    scores = {p: torch.zeros(len(blocks), blocks[0].units(PARTS[p][0])) for p in parts}
    hooks = []

    def adder(part, i, units):
        def add(t):
            scores[part][i] += t.detach().float().reshape(-1, units, t.shape[-1] // units).pow(2).sum((0, 2))
        return add

    for i, b in enumerate(blocks):
        for p in parts:
            role = PARTS[p][0]
            if p == "v":  # output rows of v
                add = adder(p, i, b.kv_heads)
                hooks.append(modules[b.names["v"]].register_forward_hook(lambda m, a, out, f=add: f(out)))
            else:  # input columns of o; the FFN's intermediate channels (input of down) for u and d
                add = adder(p, i, b.units(role))
                target = modules[b.names["o" if p == "o" else "down"]]
                hooks.append(target.register_forward_pre_hook(lambda m, a, f=add: f(a[0])))
    try:
        with torch.no_grad():
            for batch in progress(data, "S2FT activations"):
                run_batch(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return scores


def gradient_scores(model, blocks: list[Block], modules: dict[str, nn.Module], parts, data) -> dict:
    """``{part: (layers x units)}`` squared norms of the loss gradient on each unit's slice, summed over batches."""
    weights = {(i, p): modules[b.names[PARTS[p][0]]].weight for i, b in enumerate(blocks) for p in parts}
    scores = {p: torch.zeros(len(blocks), blocks[0].units(PARTS[p][0])) for p in parts}
    flags = {id(w): w.requires_grad for w in weights.values()}
    try:
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        for batch in progress(data, "S2FT gradients"):
            _loss(run_batch(model, batch)).backward()
            for (i, p), w in weights.items():
                role, axis = PARTS[p]
                grad = _linear(modules[blocks[i].names[role]], w.grad)
                scores[p][i] += unit_norms_sq(grad, axis, blocks[i].units(role))
                w.grad = None
    finally:
        for w in weights.values():
            w.grad = None
            w.requires_grad_(flags[id(w)])
        model.zero_grad(set_to_none=True)
    return scores


# -- the method ------------------------------------------------------------------------------------------------
@dataclass
class S2FT(Method):
    """Structured sparse fine-tuning. ``ratio`` sets all four part ratios at once; otherwise ``v_ratio``,
    ``o_ratio``, ``u_ratio``, ``d_ratio`` (defaults: the paper's LLaMA2-7B commonsense setting, ``o 0.052``,
    ``d 0.02``). ``gate_with_up`` also trains the ``gate`` rows of the channels selected for ``u``.
    ``targets``/``exclude`` limit which blocks' projections may be chosen. ``unit_map``: for architectures
    without a built-in entry (see :data:`deltatune.targets.UNIT_MAPS`)."""

    name = "s2ft"

    ratio: float | None = None
    v_ratio: float = 0.0
    o_ratio: float = 0.052
    u_ratio: float = 0.0
    d_ratio: float = 0.02
    selection: str = "random"
    allocation: str = "global"
    gate_with_up: bool = False
    seed: int = 0
    unit_map: dict | None = None

    def ratios(self) -> dict[str, float]:
        if self.ratio is not None:
            return dict.fromkeys(PARTS, float(self.ratio))
        return {"v": self.v_ratio, "o": self.o_ratio, "u": self.u_ratio, "d": self.d_ratio}

    def validate(self) -> None:
        ratios = self.ratios()
        if any(not 0.0 <= r <= 1.0 for r in ratios.values()) or not any(ratios.values()):
            raise ValueError(f"S2FT ratios must be in [0, 1] with at least one above 0, got {ratios}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {self.selection!r}; choose one of {SELECTIONS}")
        if self.allocation not in ("global", "layer"):
            raise ValueError(f"allocation must be 'global' or 'layer', got {self.allocation!r}")

    def scores(self, model: nn.Module, blocks: list[Block], modules: dict[str, nn.Module], parts: list[str],
               data) -> dict[str, torch.Tensor]:
        """``{part: (layers x units)}`` selection scores (higher is chosen first)."""
        if self.selection in ("activation", "gradient") and data is None:
            raise ValueError(f"S2FT(selection={self.selection!r}) ranks units on calibration data: pass a few batches "
                             "with dt.attach(model, method, data=batches)")
        if self.selection == "random":
            g = torch.Generator().manual_seed(self.seed)
            return {p: torch.rand(len(blocks), blocks[0].units(PARTS[p][0]), generator=g) for p in parts}
        if self.selection == "weight":
            def norms(b: Block, p: str) -> torch.Tensor:
                role, axis = PARTS[p]
                module = modules[b.names[role]]
                return unit_norms_sq(_linear(module, module.weight), axis, b.units(role))
            return {p: torch.stack([norms(b, p) for b in blocks]) for p in parts}
        found = (activation_scores if self.selection == "activation" else gradient_scores)(
            model, blocks, modules, parts, data)
        broadcast_(list(found.values()))  # calibration data may differ per rank: rank 0 decides for everyone
        return found

    def build_all(self, model, layers, data=None):
        modules = dict(base_modules(model))
        unit_map = UnitMap(**self.unit_map) if isinstance(self.unit_map, dict) else self.unit_map
        blocks = find_blocks(model, unit_map, modules)
        ratios = self.ratios()
        parts = [p for p in PARTS if ratios[p] > 0]
        for p in parts:  # only blocks whose projection is a target take part
            missing = [b.names[PARTS[p][0]] for b in blocks if b.names[PARTS[p][0]] not in layers]
            if len(missing) == len(blocks):
                raise ValueError(f"S2FT part {p!r}: no block's {PARTS[p][0]!r} projection is among the targets")
        scores = self.scores(model, blocks, modules, parts, data)
        built = {}
        for p in parts:
            role, axis = PARTS[p]
            eligible = [i for i, b in enumerate(blocks) if b.names[role] in layers]
            n = blocks[0].units(role)
            num = int(len(eligible) * n * ratios[p])
            chosen = select_units(scores[p][eligible], num, self.allocation)
            roles = [role, "gate"] if p == "u" and self.gate_with_up and "gate" in blocks[0].names else [role]
            for i, units in zip(eligible, chosen):
                for r in roles:
                    name = blocks[i].names[r]
                    if not units or name not in layers:
                        continue
                    w, _ = layers[name]
                    built[name] = SlicedDelta(w.shape[0], w.shape[1], blocks[i].indices(r, units), axis,
                                              dtype=adapter_dtype(w), device=w.device)
        return built
