"""SpIEL: sparse fine-tuning with prune and regrow (Ansell et al., "Scaling Sparse Fine-Tuning to LLMs", 2024).

Each target weight gets ``dW.flatten()[idx] = values`` (:class:`~deltatune.deltas.SparseDelta`) with a fixed
number of entries: ``N = density * (total model parameters)`` (or ``num_params``), split over the target matrices
in proportion to their size, ``k_W = floor(N numel(W) / sum numel)``. ``idx`` starts as a random subset, ``values``
at zero.

Every ``R = reselection_steps`` steps the controller swaps part of each matrix's active set (SpIEL-AG):

1. during the first ``A = accumulation_steps`` optimizer steps of the period it watches the dense gradient
   ``G = dL/dW``: the first backward picks ``k_W`` candidate positions with the largest ``|G|`` among the inactive
   ones, and the following backwards accumulate ``sum G`` at the candidates;
2. at the end of step ``A - 1`` of the period it drops the ``n = p k_W`` active entries with the smallest
   ``|values|`` (they return to their pretrained value) and activates the ``n`` candidates with the largest
   ``|sum G|``, at value zero and with fresh optimizer state;
3. the fraction ``p`` is 1 at the first reselection (the random start is replaced entirely), then decays:
   ``p = zeta0 (1 - t/T)`` (``schedule="linear"``) or ``zeta0 (1 + cos(pi t/T)) / 2`` (``"cosine"``),
   ``zeta0 = replace_rate``; constant ``zeta0`` when the number of steps ``T`` is unknown.

The active count of every matrix never changes and indices stay unique. Weight decay on ``values`` pulls the
entries toward the pretrained weights (the papers tune it); nothing outside ``idx`` ever moves. Under
``torch.distributed`` rank 0's candidates decide for every rank.

LT-SFT (lottery-ticket sparse fine-tuning, Ansell et al., ACL'22) chooses its entries once instead:

1. phase 1, ``full_steps`` steps: every entry of the target matrices trains (``dW`` dense, ``theta - theta_0``);
2. selection: the ``N`` entries with the largest ``|dW|`` over all target matrices together (a global threshold);
3. reset: the kept entries go back to zero (``theta = theta_0``) and their optimizer state is dropped (a fresh
   optimizer, as the paper rebuilds it);
4. phase 2, the remaining steps: only the kept entries train.

Sparse adapters compose by addition: train a task adapter on top of a frozen language adapter with
``dt.set_active(model, ["lang", "task"], trainable="task")`` and swap the language adapter at inference
(composable sparse fine-tuning).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..budget.resize import keep_components_, reset_entries_
from ..sharding import is_sharded
from ..budget.sync import broadcast_exact_
from ..deltas import Delta, SparseDelta
from ..layers import base_parameter_count
from .base import Controller, Method, StepInfo, adapter_dtype


# -- pure tensor math -------------------------------------------------------------------------------------------
def entry_budgets(numels: dict[str, int], total: int) -> dict[str, int]:
    """``k_W = floor(total * numel(W) / sum numel)`` for every matrix."""
    s = sum(numels.values())
    return {n: int(total * m // s) for n, m in numels.items()}


def random_subset(n: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` distinct integers drawn uniformly from ``[0, n)``, sorted, in O(k) memory when ``k`` is small (a full
    permutation of every weight's entries would leave hundreds of MB of freed heap behind)."""
    if 4 * k >= n:
        return torch.randperm(n, generator=generator)[:k].sort().values
    out = torch.empty(0, dtype=torch.long)
    while out.numel() < k:
        draw = torch.randint(n, (int(1.1 * (k - out.numel())) + 16,), generator=generator)
        out = torch.unique(torch.cat([out, draw]))
    return out[torch.randperm(out.numel(), generator=generator)[:k]].sort().values


def global_top_entries(values: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """For each tensor, the positions of its entries among the ``n`` largest ``|value|`` of all tensors together."""
    flat = torch.cat([v.detach().reshape(-1).abs().float() for v in values])
    top = torch.topk(flat, min(n, flat.numel()), sorted=False).indices.sort().values
    out, offset = [], 0
    for v in values:
        out.append(top[(top >= offset) & (top < offset + v.numel())] - offset)
        offset += v.numel()
    return out


def replace_fraction(step: int, total: int | None, rate: float, schedule: str) -> float:
    """SpIEL's decaying reselection rate at ``step`` of ``total``."""
    if total is None:
        return rate
    t = min(step / max(total, 1), 1.0)
    return rate * (1 - t) if schedule == "linear" else rate * (1 + math.cos(math.pi * t)) / 2


def candidates(G: torch.Tensor, active: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` flat positions with the largest ``|G|`` that are not in ``active``."""
    score = G.detach().reshape(-1).abs().float()
    score[active] = -1.0
    return torch.topk(score, min(k, score.numel() - active.numel()), sorted=False).indices


def prune_regrow(values: torch.Tensor, cand: torch.Tensor, cand_grad: torch.Tensor, n: int):
    """``(drop, grow)``: positions in ``values`` of the ``n`` smallest ``|values|`` and the ``n`` candidates with the
    largest ``|accumulated gradient|``."""
    n = min(n, values.numel(), cand.numel())
    drop = torch.topk(values.detach().abs(), n, largest=False).indices
    grow = cand[torch.topk(cand_grad.abs(), n).indices]
    return drop, grow


# -- the controller -----------------------------------------------------------------------------------------------
class GrowthTracker:
    """Accumulates ``G`` at regrowth candidates for one delta (installed as the delta's ``observer``)."""

    def __init__(self, delta: SparseDelta):
        self.delta = delta
        self.reset()

    def reset(self) -> None:
        self.cand: torch.Tensor | None = None
        self.grad_sum: torch.Tensor | None = None
        self.count = 0

    def snapshot(self) -> tuple:
        """``(cand, grad_sum, count)``, copied."""
        return self.cand, None if self.grad_sum is None else self.grad_sum.clone(), self.count

    @classmethod
    def restored(cls, delta: SparseDelta, snap: tuple) -> "GrowthTracker":
        tracker = cls(delta)
        tracker.cand, tracker.grad_sum, tracker.count = snap
        return tracker

    def __call__(self, G: torch.Tensor) -> None:
        if self.cand is None:
            self.cand = candidates(G, self.delta.idx, self.delta.idx.numel())
            self.grad_sum = torch.zeros(self.cand.numel(), dtype=torch.float32, device=G.device)
        self.grad_sum += G.detach().reshape(-1).index_select(0, self.cand).float()
        self.count += 1


def sparse_deltas(deltas: dict[str, Delta]) -> dict[str, SparseDelta]:
    """The sparse deltas among an adapter's ``{module name: delta}`` (its ``modules_to_save`` entries left out)."""
    return {n: d for n, d in deltas.items() if isinstance(d, SparseDelta)}


class SpIELController(Controller):
    """Watches gradients during the first ``A`` steps of every period of ``R`` and swaps entries at its end."""

    def __init__(self, method: "SpIEL", deltas: dict[str, SparseDelta]):
        self.m, self.deltas = method, deltas
        self.total: int | None = None
        self.selections = 0
        self.last_fraction = 0.0
        self.trackers: dict[str, GrowthTracker] = {}
        self._loaded = False
        self._unsure: dict | None = None  # after load_state_dict: the trackers as loaded (see _arm)
        self._arm(0)  # watch from the first step even when dt.begin is never called

    def _watching(self, step: int) -> bool:
        """Whether the backward of ``step`` feeds the trackers: the first ``A`` steps of each period, while steps
        remain."""
        return step % self.m.reselection_steps < self.m.accumulation_steps and (self.total is None or step < self.total)

    def _arm(self, step: int | None) -> None:
        """Install the trackers as observers for the backward of ``step``. ``None``: the step is not known (right
        after :meth:`load_state_dict`, before ``begin``): watch, and keep a copy of the trackers that
        :meth:`_settle` puts back once the step turns out not to be watched."""
        self._unsure = None if step is not None else {n: t.snapshot() for n, t in self.trackers.items()}
        watch = step is None or self._watching(step)
        for name, d in self.deltas.items():
            d.observer = self.trackers.setdefault(name, GrowthTracker(d)) if watch else None

    def _settle(self, step: int) -> None:
        """Now that the step watched without knowing it is known: undo what its backward added if it was not a
        watch step."""
        if self._unsure is not None and not self._watching(step):
            self.trackers = {n: GrowthTracker.restored(self.deltas[n], snap) for n, snap in self._unsure.items()}
        self._unsure = None

    def begin(self, info: StepInfo) -> None:
        step = info.step  # 0, or where a resumed run continues
        if self._unsure is not None:  # no backward ran since load_state_dict: the trackers are as loaded
            self.trackers = {n: GrowthTracker.restored(self.deltas[n], snap) for n, snap in self._unsure.items()}
        self.total = info.total_steps if info.total_steps is not None or step == 0 else self.total
        if step == 0:
            self.trackers, self.selections = {}, 0
        elif not self._loaded:  # resumed without saved state: guess whether the first reselection happened
            self.trackers, self.selections = {}, int(step >= self.m.accumulation_steps)
        self._arm(step)

    def state_dict(self) -> dict:
        """``total``, how many reselections happened (the first replaces everything), the last rate and, per module
        being watched, the candidate positions, their accumulated gradients and how many backwards were summed."""
        trackers = {name: {"cand": t.cand, "grad_sum": t.grad_sum, "count": t.count}
                    for name, t in self.trackers.items() if t.cand is not None}
        return {"total": self.total, "selections": self.selections, "last_fraction": self.last_fraction,
                "trackers": trackers}

    def load_state_dict(self, state: dict) -> None:
        """Restore the state. The step it continues from comes with the next ``begin`` or ``after_step``
        (:meth:`_arm` with ``None``)."""
        self.total = state.get("total", self.total)
        self.selections = int(state.get("selections", self.selections))
        self.last_fraction = float(state.get("last_fraction", self.last_fraction))
        trackers = {}
        for name, t in state.get("trackers", {}).items():
            d = self.deltas.get(name)
            if d is None:
                raise ValueError(f"the controller state names module {name!r}, which this adapter has no sparse "
                                 "delta for")
            cand, grad_sum = t["cand"].to(d.idx.device, torch.long), t["grad_sum"].to(d.idx.device, torch.float32)
            if cand.shape != grad_sum.shape or cand.numel() > d.out_features * d.in_features:
                raise ValueError(f"controller state of {name!r}: {cand.numel()} candidates with "
                                 f"{grad_sum.numel()} accumulated gradients do not fit its weight")
            trackers[name] = GrowthTracker.restored(d, (cand, grad_sum, int(t["count"])))
        self.trackers, self._loaded = trackers, True
        self._arm(None)

    def after_step(self, info: StepInfo) -> bool:
        step = info.step
        self._settle(step)
        if step % self.m.reselection_steps == self.m.accumulation_steps - 1 and self.trackers:
            self._reselect(info.optimizer, step)
        self._arm(step + 1)
        return False

    def _reselect(self, optimizer, step: int) -> None:
        for d in self.deltas.values():
            if is_sharded(d.values):
                raise RuntimeError("SpIEL regrowth under FSDP2 is not supported (the entries would have to move "
                                   "between shards): train SpIEL with DDP, or with reselection_steps larger than the "
                                   "run (a fixed support) under FSDP2")
        fraction = 1.0 if self.selections == 0 else replace_fraction(step, self.total, self.m.replace_rate,
                                                                     self.m.schedule)
        for name, d in self.deltas.items():
            tracker = self.trackers.get(name)
            if tracker is None or tracker.cand is None:
                continue
            drop, grow = prune_regrow(d.values, tracker.cand, tracker.grad_sum, int(fraction * d.idx.numel()))
            with torch.no_grad():
                d.idx[drop] = grow
                d.values[drop] = 0.0
            reset_entries_(d.values, drop, optimizer)
        broadcast_exact_([d.idx for d in self.deltas.values()])
        for t in self.trackers.values():
            t.reset()
        self.selections += 1
        self.last_fraction = fraction

    def metrics(self) -> dict[str, float]:
        return {"replaced": self.last_fraction}


# -- the method ------------------------------------------------------------------------------------------------
@dataclass
class SpIEL(Method):
    """Sparse fine-tuning of a fixed number of weight entries with gradient-based prune and regrow.
    ``density``: fraction of the *total* model parameters that train (``num_params`` overrides it);
    ``regrow="none"`` keeps the random initial entries (no controller)."""

    name = "spiel"

    density: float = 0.01
    num_params: int | None = None
    regrow: str = "gradient"
    reselection_steps: int = 20
    accumulation_steps: int = 5
    replace_rate: float = 0.2
    schedule: str = "linear"
    seed: int = 0

    def validate(self) -> None:
        if self.num_params is None and not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.num_params is not None and self.num_params <= 0:
            raise ValueError(f"num_params must be positive, got {self.num_params}")
        if self.regrow not in ("gradient", "none"):
            raise ValueError(f"regrow must be 'gradient' or 'none', got {self.regrow!r}")
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        if not 1 <= self.accumulation_steps <= self.reselection_steps:
            raise ValueError(f"need 1 <= accumulation_steps ({self.accumulation_steps}) <= reselection_steps "
                             f"({self.reselection_steps})")
        if not 0.0 <= self.replace_rate <= 1.0:
            raise ValueError(f"replace_rate must be in [0, 1], got {self.replace_rate}")

    def build_all(self, model, layers, data=None):
        total = self.num_params if self.num_params is not None else int(self.density * base_parameter_count(model))
        budgets = entry_budgets({n: w.numel() for n, (w, _) in layers.items()}, total)
        g = torch.Generator().manual_seed(self.seed)
        built = {}
        for name, (w, _) in layers.items():
            k = budgets[name]
            if k == 0:
                continue
            idx = random_subset(w.numel(), k, g).to(w.device)
            built[name] = SparseDelta(w.shape[0], w.shape[1], idx, dtype=adapter_dtype(w), device=w.device)
        return built

    def controller(self, deltas: dict[str, Delta], model: nn.Module) -> SpIELController | None:
        if self.regrow == "none":
            return None
        return SpIELController(self, sparse_deltas(deltas))


# -- LT-SFT -------------------------------------------------------------------------------------------------------
class LotteryTicketController(Controller):
    """Dense phase 1 until ``full_steps``; then the global top-``budget`` entries by ``|dW|``, reset to zero."""

    def __init__(self, method: "LTSFT", deltas: dict[str, SparseDelta], budget: int):
        self.m, self.deltas, self.budget = method, deltas, budget
        self.full_steps = method.full_steps
        self.selected = False

    def begin(self, info: StepInfo) -> None:
        if self.m.full_steps is None and info.total_steps is not None:
            self.full_steps = max(1, info.total_steps // 2)
        if not info.resizable:
            raise ValueError("LT-SFT drops the unselected entries after phase 1, which changes parameter shapes; "
                             "use the deltatune trainer (it rebuilds DDP) or a single process")

    def after_step(self, info: StepInfo) -> bool:
        step, optimizer = info.step, info.optimizer
        if self.selected:
            return False
        if self.full_steps is None:
            raise ValueError("LTSFT needs to know when phase 1 ends: give full_steps=, or call "
                             "dt.begin(model, total_steps) (phase 1 is then the first half)")
        if step < self.full_steps - 1:
            return False
        found = list(self.deltas.values())
        if optimizer is None:
            raise ValueError("LT-SFT's selection removes entries: pass the optimizer to dt.step(model, optimizer)")
        for d, keep in zip(found, global_top_entries([d.values for d in found], self.budget)):
            keep_components_(d, keep, optimizer)
            with torch.no_grad():
                d.values.zero_()  # back to the pretrained weights
            optimizer.state.pop(d.values, None)  # phase 2 starts with fresh optimizer state
            if d.values.grad is not None:
                d.values.grad.zero_()
        self.selected = True
        return True

    def metrics(self) -> dict[str, float]:
        return {"phase": 2.0 if self.selected else 1.0}

    def state_dict(self) -> dict:
        """The phase (``selected``: phase 2) and where phase 1 ends."""
        return {"selected": self.selected, "full_steps": self.full_steps}

    def load_state_dict(self, state: dict) -> None:
        self.selected = bool(state.get("selected", False))
        self.full_steps = state.get("full_steps", self.full_steps)


@dataclass
class LTSFT(Method):
    """Lottery-ticket sparse fine-tuning: dense phase 1 for ``full_steps`` (default: half of training), then the
    ``density x (all model parameters)`` (or ``num_params``) entries that moved most train alone from zero.
    Phase 1 keeps a full-size delta per target matrix (full fine-tuning memory for those matrices)."""

    name = "ltsft"

    density: float = 0.01
    num_params: int | None = None
    full_steps: int | None = None

    def validate(self) -> None:
        if self.num_params is None and not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.num_params is not None and self.num_params <= 0:
            raise ValueError(f"num_params must be positive, got {self.num_params}")
        if self.full_steps is not None and self.full_steps < 1:
            raise ValueError(f"full_steps must be >= 1, got {self.full_steps}")

    def budget(self, model: nn.Module) -> int:
        """``num_params``, or ``density`` times the model's parameter count without adapters."""
        return self.num_params if self.num_params is not None else int(self.density * base_parameter_count(model))

    def build_all(self, model, layers, data=None):
        return {name: SparseDelta(w.shape[0], w.shape[1], torch.arange(w.numel(), device=w.device),
                                  dtype=adapter_dtype(w), device=w.device) for name, (w, _) in layers.items()}

    def controller(self, deltas: dict[str, Delta], model: nn.Module) -> LotteryTicketController | None:
        found = sparse_deltas(deltas)
        if found and all(d.idx.numel() < d.out_features * d.in_features for d in found.values()):
            return None  # a loaded adapter, already past its selection: its entries simply train
        return LotteryTicketController(self, found, self.budget(model))
