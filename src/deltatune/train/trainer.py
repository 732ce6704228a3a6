"""A small training loop for adapters: AdamW on the trainable parameters, warm-up plus linear or cosine decay,
gradient accumulation, periodic evaluation, JSONL metrics and a plot, and the controller protocol.

One optimizer step::

    for each of grad_accum micro-batches:  loss_sum / items_in_step -> backward   (DDP syncs on the last one)
    clip gradients
    dt.after_backward(model)     # controllers see the (clipped, all-reduced) gradients
    optimizer.step()
    dt.step(model, optimizer)    # controllers mask, prune, grow (before training: dt.begin(model, total_steps))
    scheduler.step(); optimizer.zero_grad()

Controllers' numbers (e.g. AdaLoRA's ``budget`` and current total ``rank``) go into every training log record.

Checkpoints (``save_every=N``): every ``N`` optimizer steps rank 0 writes ``output_dir/checkpoint-<step>/`` with
``adapter/`` (``dt.save``: the adapters with their controller state and the step counter) and
``trainer_state.json`` + ``trainer_state.safetensors`` (optimizer and scheduler state, torch's RNG state, the log so
far; no pickle). ``train(..., resume_from=checkpoint)`` replaces the model's adapters of the same names by the
checkpoint's, restores everything else, replays the data order up to that step and continues: the run ends as an
uninterrupted one would, decisions (ranks, masks, indices) included.

The loss is summed over items (examples for classification, response tokens for causal LM) and divided by the
number of items in the whole step, on all ranks together. So ``batch_size=4, grad_accum=2`` gives the same update
as ``batch_size=8``, and two DDP ranks with batch 4 the same as one process with batch 8.

Under ``torch.distributed`` (initialized by the caller, e.g. through ``torchrun``) the model is wrapped in
``DistributedDataParallel``, each rank reads its shard through a ``DistributedSampler``, the global batch is
``batch_size * grad_accum * world_size``, and only rank 0 shows progress and writes files. When a controller
changes parameter shapes (AdaLoRA shrinking, IncreLoRA growing) the DDP wrapper is rebuilt around the new ones.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from .. import control as C
from ..hf import restore
from ..io import save
from ..files import read_json, read_tensors, write_generation, write_json, write_tensors
from ..io.state import join_state, split_state
from ..layers import REGISTRY_ATTR, unwrap
from ..runtime import freed_memory_retained
from .data import IGNORE_INDEX, TASKS, Collator
from .fields import typed_fields
from .metrics import METRICS_NAME, PLOT_NAME, RUN_START, MetricsLog, read_metrics, write_plot

SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class TrainArgs:
    """Training hyperparameters. ``batch_size`` is per rank and per micro-batch; ``max_steps`` (optimizer steps)
    overrides ``epochs``; ``eval_every`` is in optimizer steps (the end of training always evaluates)."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 8
    eval_batch_size: int | None = None
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None
    log_every: int = 1
    seed: int = 0
    shuffle: bool = True
    num_workers: int = 0
    progress: bool = True
    plot: bool = True
    save_adapter: bool = True
    save_every: int | None = None  # optimizer steps between resumable checkpoints (output_dir/checkpoint-<step>)
    retain_freed_memory: bool = True  # on CPU, while training: see deltatune.runtime (no page faults every step)

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        for name in ("batch_size", "grad_accum", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_steps is None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0 (or set max_steps), got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0 or self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0 and warmup_ratio in [0, 1)")
        if self.save_every is not None and (not isinstance(self.save_every, int) or self.save_every < 1):
            raise ValueError(f"save_every must be a positive integer (or None), got {self.save_every!r}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1 (or None), got {self.eval_every}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainArgs":
        """From a mapping (a YAML section); see :func:`~deltatune.train.fields.typed_fields`."""
        args = cls(**typed_fields(cls, d, "training argument"))
        args.validate()
        return args


# -- small pure pieces -------------------------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    """Seed Python, NumPy (if installed) and torch."""
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    torch.manual_seed(seed)


def lr_factor(step: int, total: int, warmup: int, schedule: str = "linear") -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total``: linear warm-up over
    ``warmup`` steps (``(step + 1) / warmup``), then linear or cosine decay towards 0, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups: matrices decay, vectors (biases, norms) do not."""
    params = [p for p in unwrap(model).parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; attach an adapter first: dt.attach(model, dt.LoRA())")
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0})
            if g["params"]]


def _logits(outputs) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    return outputs.logits if hasattr(outputs, "logits") else outputs[0]


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, int]:
    """``(sum of per-item losses, number of items)``. Classification: cross-entropy per example. Causal LM:
    next-token cross-entropy per label token that is not -100."""
    if task == "classification":
        return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()
    logits, labels = logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((labels != IGNORE_INDEX).sum())


def count_items(batch: dict, task: str) -> int:
    labels = batch["labels"]
    return labels.numel() if task == "classification" else int((labels[:, 1:] != IGNORE_INDEX).sum())


def _split(batch: dict) -> tuple[dict, torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return inputs, batch["labels"]


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# -- distributed helpers -------------------------------------------------------------------------------------------
def _dist() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum a few numbers over ranks (identity in a single process)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if _dist()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


def _device(model: nn.Module) -> torch.device:
    p = next(unwrap(model).parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# -- evaluation ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, task: str) -> dict[str, float]:
    """Evaluation metrics over ``loader``: ``eval_loss`` and ``eval_accuracy`` (classification) or
    ``eval_loss`` and ``eval_perplexity`` (causal LM, per response token). Under DDP each rank passes its own
    shard and the sums are combined, so every rank returns the metrics of the whole set."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    device = _device(inner)
    total, items, correct = 0.0, 0, 0
    for batch in loader:
        inputs, labels = _split(_to(batch, device))
        logits = _logits(inner(**inputs))
        loss, n = loss_sum(logits, labels, task)
        total, items = total + loss.item(), items + n
        if task == "classification":
            correct += int((logits.argmax(-1) == labels).sum())
    inner.train(was_training)
    total, items, correct = _all_sum([total, items, correct], device)
    if items == 0:
        raise ValueError("the evaluation data has no items to score")
    loss = total / items
    if task == "classification":
        return {"eval_loss": loss, "eval_accuracy": correct / items}
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def eval_loader(data: Sequence, batch_size: int, collate_fn: Callable) -> DataLoader:
    """An in-order loader over this rank's shard (``data[rank::world]``, no padding duplicates)."""
    rank, world = _dist()
    shard = [data[i] for i in range(rank, len(data), world)]
    return DataLoader(shard, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)


# -- checkpoints ---------------------------------------------------------------------------------------------------
CHECKPOINT_PREFIX = "checkpoint-"
STATE_NAME = "trainer_state"


def save_checkpoint(folder: str | Path, model: nn.Module, optimizer, scheduler, step: int,
                    history: Sequence[dict] = ()) -> Path:
    """Write a resumable checkpoint (see the module docstring) as one folder generation (staged, then swapped in
    atomically: a kill leaves the previous checkpoint or this one, whole)."""
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": torch.get_rng_state(), "history": list(history)}
    device = _device(model)
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    value, tensors = split_state(state, "")

    def fill(staging: Path) -> None:
        save(model, staging / "adapter")
        write_tensors(staging / f"{STATE_NAME}.safetensors", tensors)
        write_json(staging / f"{STATE_NAME}.json", value)
    return write_generation(folder, fill)


def read_checkpoint(folder: str | Path) -> dict:
    """The trainer state of a checkpoint written by :func:`save_checkpoint`."""
    folder = Path(folder)
    path = folder / f"{STATE_NAME}.json"
    if not path.is_file() or not (folder / "adapter").is_dir():
        raise FileNotFoundError(f"{folder} is not a deltatune training checkpoint (no {path.name} and adapter/); "
                                f"pass a {CHECKPOINT_PREFIX}<step> folder written with save_every")
    return join_state(read_json(path), read_tensors(folder / f"{STATE_NAME}.safetensors"), where=str(folder))


def last_checkpoint(output_dir: str | Path) -> Path:
    """The newest ``checkpoint-<step>`` folder in ``output_dir`` (``train.save_every`` writes them)."""
    steps = ((p.name[len(CHECKPOINT_PREFIX):], p) for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"))
    found = sorted((int(step), p) for step, p in steps if p.is_dir() and step.isdigit())
    if not found:
        raise FileNotFoundError(f"no checkpoint-<step> folder in {output_dir} to resume from; set train.save_every "
                                "to write them, or name a checkpoint folder")
    return found[-1][1]


# -- the loop: data, optimizer, resuming ----------------------------------------------------------------------------
def check_run(args: TrainArgs, task: str, train_data: Sequence, output_dir) -> None:
    """Refuse a run that cannot start: invalid ``args``, an unknown ``task``, no training data, or ``save_every``
    without an ``output_dir`` to write the checkpoints into."""
    args.validate()
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if not len(train_data):
        raise ValueError("train_data is empty")
    if args.save_every and output_dir is None:
        raise ValueError("save_every writes checkpoints into output_dir: pass output_dir=...")


def resume_adapters(model: nn.Module, resume_from: str | Path | None) -> dict | None:
    """The trainer state of checkpoint ``resume_from`` (``None`` for a fresh run), after replacing the model's
    adapters of the same names by the checkpoint's (with their controller state)."""
    if resume_from is None:
        return None
    resumed = read_checkpoint(resume_from)
    restore(model, Path(resume_from) / "adapter")
    return resumed


def train_loader(data: Sequence, args: TrainArgs, collate_fn: Callable) -> DataLoader:
    """The training loader: this rank's shard through a ``DistributedSampler`` under ``torch.distributed``, else
    a ``RandomSampler`` seeded with ``args.seed`` (its own generator) or, without ``shuffle``, the data in order."""
    rank, world = _dist()
    if world > 1:
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=args.shuffle, seed=args.seed)
    elif args.shuffle:
        sampler = RandomSampler(data, generator=torch.Generator().manual_seed(args.seed))
    else:
        sampler = SequentialSampler(data)
    return DataLoader(data, batch_size=args.batch_size, sampler=sampler, collate_fn=collate_fn,
                      num_workers=args.num_workers)


def total_steps(args: TrainArgs, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: ``max_steps``, else ``ceil(epochs * batches_per_epoch / grad_accum)`` (>= 1)."""
    return args.max_steps or max(1, math.ceil(args.epochs * batches_per_epoch / args.grad_accum))


def optimizer_and_schedule(model: nn.Module, args: TrainArgs, total: int):
    """``(AdamW over param_groups, LambdaLR of lr_factor)``; warm-up: ``warmup_steps``, else
    ``int(warmup_ratio * total)``."""
    warmup = args.warmup_steps or int(args.warmup_ratio * total)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, args.schedule))
    return optimizer, scheduler


def resume_optimizer(resumed: dict | None, resume_from, optimizer, scheduler, total: int) -> int:
    """The first step of this run: 0 for a fresh run, else the checkpoint's step (``0 < step < total``) after
    loading its optimizer and scheduler state."""
    if resumed is None:
        return 0
    first = int(resumed["step"])
    if not 0 < first < total:
        raise ValueError(f"{resume_from} is at step {first}, but this run has {total} steps: nothing to resume")
    try:
        optimizer.load_state_dict(resumed["optimizer"])
    except ValueError as e:
        raise ValueError(f"{resume_from}: its optimizer state does not fit the adapters' parameters ({e}); "
                         "resume with the same method and training arguments") from None
    scheduler.load_state_dict(resumed["scheduler"])
    return first


def restore_rng(resumed: dict | None, device: torch.device) -> None:
    """Put back the checkpoint's torch RNG state (and its CUDA one on a CUDA device); nothing for a fresh run."""
    if resumed is None:
        return
    torch.set_rng_state(resumed["rng"])
    if "cuda_rng" in resumed and device.type == "cuda":
        torch.cuda.set_rng_state(resumed["cuda_rng"], device)


def _batches(loader: DataLoader) -> Iterator[dict]:
    """The loader's batches, epoch after epoch (reshuffled per epoch)."""
    epoch = 0
    while True:
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def batch_stream(loader: DataLoader, skip: int) -> Iterator[dict]:
    """The loader's batches epoch after epoch, the first ``skip`` of them already drawn (now, not lazily: a resumed
    run replays the uninterrupted run's data order, and its random draws, before its RNG state is restored)."""
    stream = _batches(loader)
    for _ in range(skip):
        next(stream)
    return stream


# -- the loop: one optimizer step ------------------------------------------------------------------------------------
class _Net:
    """The module the forward pass runs: ``DistributedDataParallel(model)`` under ``torch.distributed`` (rebuilt
    when parameters change shape), else the model itself."""

    def __init__(self, model: nn.Module, world: int):
        self.model, self.world, self.device = model, world, _device(model)
        self.module = nn.parallel.DistributedDataParallel(model) if world > 1 else model

    def rebuild(self) -> None:
        """After a controller changed parameter shapes: DDP's buckets must be rebuilt (nothing in one process)."""
        if self.world > 1:
            self.module = None  # drop the old wrapper first
            self.module = nn.parallel.DistributedDataParallel(self.model)


def step_items(micro: Sequence[dict], task: str, device: torch.device) -> float:
    """Items (examples or response tokens) in the whole step: all micro-batches, all ranks."""
    items = _all_sum([sum(count_items(b, task) for b in micro)], device)[0]
    if items == 0:
        raise ValueError("a training step has no items with labels (every response token masked?)")
    return items


def accumulate_gradients(net: _Net, micro: Sequence[dict], items: float, task: str) -> float:
    """``backward(loss_sum * world / items)`` per micro-batch, so that DDP's mean over ranks is the gradient of the
    mean loss over the step's items; DDP all-reduces on the last micro-batch only. Returns this rank's loss sum."""
    step_loss = 0.0
    for i, batch in enumerate(micro):
        inputs, labels = _split(_to(batch, net.device))
        defer_sync = net.world > 1 and i < len(micro) - 1
        with net.module.no_sync() if defer_sync else contextlib.nullcontext():
            loss, _ = loss_sum(_logits(net.module(**inputs)), labels, task)
            (loss * (net.world / items)).backward()
        step_loss += loss.item()
    return step_loss


def optimizer_step(net: _Net, micro: Sequence[dict], items: float, optimizer, scheduler, task: str,
                   max_grad_norm: float | None, adapted: bool) -> tuple[float, float]:
    """One optimizer step as the module docstring writes it (controllers only on a model with adapters); returns
    ``(this rank's loss sum, the learning rate of the step)``."""
    step_loss = accumulate_gradients(net, micro, items, task)
    if max_grad_norm:  # read the groups each step: a controller may have changed them
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    if adapted:
        C.after_backward(net.model, optimizer)
    optimizer.step()
    if adapted and C.step(net.model, optimizer):
        net.rebuild()
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, lr


# -- the loop: reporting -------------------------------------------------------------------------------------------
def progress_bar(show: bool, total: int, first: int):
    """A tqdm bar over the run's steps from ``first``; ``None`` when not shown."""
    if not show:
        return None
    from tqdm.auto import tqdm  # third-party, imported when a bar is drawn

    return tqdm(total=total, initial=first, desc="train", dynamic_ncols=True)


class _Report:
    """What follows each optimizer step: a training record every ``log_every`` steps (mean loss over them, lr,
    epoch, time, controller numbers), evaluation every ``eval_every`` steps, a checkpoint every ``save_every``
    steps (rank 0, not at the last step), and the progress bar. The last step always logs and evaluates."""

    def __init__(self, log: MetricsLog, args: TrainArgs, total: int, first: int, *, main: bool, model: nn.Module,
                 adapted: bool, task: str, evals: DataLoader | None, batches_per_epoch: int,
                 optimizer, scheduler, output_dir: Path | None):
        self.log, self.args, self.total, self.main = log, args, total, main
        self.model, self.adapted, self.task, self.evals = model, adapted, task, evals
        self.batches_per_epoch, self.optimizer, self.scheduler = batches_per_epoch, optimizer, scheduler
        self.output_dir = output_dir
        self.bar = progress_bar(main and args.progress, total, first)
        self.start, self.window, self.last_eval = time.perf_counter(), [], None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def after_step(self, done: int, loss: float, lr: float) -> None:
        """Report optimizer step ``done`` (1-based) with its mean loss per item and learning rate."""
        self.window.append(loss)
        if done % self.args.log_every == 0 or done == self.total:
            self.log_training(done, lr)
        if self.evals is not None and ((self.args.eval_every and done % self.args.eval_every == 0)
                                       or done == self.total):
            self.last_eval = evaluate(self.model, self.evals, self.task)
            self.log.add({"step": done, **self.last_eval, "time": self.elapsed()})
        if self.main and self.args.save_every and done % self.args.save_every == 0 and done < self.total:
            save_checkpoint(self.output_dir / f"{CHECKPOINT_PREFIX}{done}", self.model, self.optimizer,
                            self.scheduler, done, self.log.records)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")

    def log_training(self, done: int, lr: float) -> None:
        """One training record: the mean loss since the last one, lr, epoch, time and the controllers' numbers."""
        self.log.add({"step": done, "loss": sum(self.window) / len(self.window), "lr": lr,
                      "epoch": done * self.args.grad_accum / self.batches_per_epoch, "time": self.elapsed(),
                      **(C.controller_metrics(self.model) if self.adapted else {})})
        self.window = []

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_outputs(report: _Report, world: int) -> dict:
    """The result of :func:`train`; rank 0 with an ``output_dir`` also writes the plot and the adapters."""
    log, args, out = report.log, report.args, report.output_dir
    result = {"steps": report.total,
              "train_loss": next((r["loss"] for r in reversed(log.records) if "loss" in r), None),
              "eval": report.last_eval, "history": log.records, "time": report.elapsed(), "world_size": world,
              "metrics_path": None, "plot_path": None, "adapter_path": None}
    if report.main and out is not None:
        result["metrics_path"] = str(log.path)
        if args.plot:
            plot = write_plot(log.records, out / PLOT_NAME)
            result["plot_path"] = str(plot) if plot else None
        if args.save_adapter and report.adapted:
            result["adapter_path"] = str(save(report.model, out / "adapter"))
    return result


# -- the loop ------------------------------------------------------------------------------------------------------
def train(
    model: nn.Module,
    train_data: Sequence[dict],
    args: TrainArgs | None = None,
    *,
    task: str = "classification",
    eval_data: Sequence[dict] | None = None,
    collate_fn: Callable | None = None,
    output_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
) -> dict:
    """Train the model's trainable parameters on encoded examples: its active adapters, or whatever else the caller
    left trainable (every weight, for a full fine-tuning baseline; controllers and adapter saving then do nothing).

    ``train_data`` / ``eval_data``: sequences of encoded examples (see :mod:`deltatune.train.data`);
    ``collate_fn`` defaults to :class:`~deltatune.train.data.Collator` with pad id 0. With ``output_dir``, rank 0
    writes ``metrics.jsonl``, ``metrics.png`` and (``args.save_adapter``) the adapters to ``output_dir/adapter``,
    and with ``args.save_every`` resumable checkpoints to ``output_dir/checkpoint-<step>``. ``resume_from``: such a
    checkpoint; training continues from its step with its adapters, optimizer, scheduler and RNG state.

    Returns ``{"steps", "train_loss", "eval": {...} or None, "history", "time", "world_size",
    "metrics_path", "plot_path", "adapter_path"}`` (paths ``None`` when not written).
    """
    args = args or TrainArgs()
    check_run(args, task, train_data, output_dir)
    resumed = resume_adapters(model, resume_from)
    adapted = REGISTRY_ATTR in unwrap(model).__dict__  # controllers run only on models with adapters
    rank, world = _dist()
    collate_fn = collate_fn or Collator()
    output_dir = Path(output_dir) if output_dir is not None else None
    set_seed(args.seed)

    inner = unwrap(model)
    device = _device(inner)
    retain = device.type == "cpu" and args.retain_freed_memory
    with freed_memory_retained() if retain else contextlib.nullcontext():
        loader = train_loader(train_data, args, collate_fn)
        evals = eval_loader(eval_data, args.eval_batch_size or args.batch_size, collate_fn) if eval_data else None
        total = total_steps(args, len(loader))
        optimizer, scheduler = optimizer_and_schedule(inner, args, total)
        first = resume_optimizer(resumed, resume_from, optimizer, scheduler, total)
        net = _Net(inner, world)
        if adapted:  # shapes may change: _Net rebuilds the DDP wrapper when they do
            C.begin(inner, total, resizable=True, step=first)
        log = MetricsLog(output_dir, rank == 0, resumed["history"] if resumed is not None else ())

        was_training = inner.training
        inner.train()
        stream = batch_stream(loader, skip=first * args.grad_accum)  # the same data order as the uninterrupted run
        restore_rng(resumed, device)
        report = _Report(log, args, total, first, main=rank == 0, model=inner, adapted=adapted, task=task,
                         evals=evals, batches_per_epoch=len(loader), optimizer=optimizer, scheduler=scheduler,
                         output_dir=output_dir)
        for step in range(first, total):
            micro = [next(stream) for _ in range(args.grad_accum)]
            items = step_items(micro, task, device)
            loss, lr = optimizer_step(net, micro, items, optimizer, scheduler, task, args.max_grad_norm, adapted)
            report.after_step(step + 1, _all_sum([loss], device)[0] / items, lr)
        report.close()
        inner.train(was_training)

        result = write_outputs(report, world)
        if world > 1:
            dist.barrier()
        return result


# METRICS_NAME, PLOT_NAME, RUN_START, read_metrics, write_plot: from .metrics, importable from here as before
__all__ = ["METRICS_NAME", "PLOT_NAME", "RUN_START", "TrainArgs", "evaluate", "eval_loader", "last_checkpoint",
           "loss_sum", "lr_factor", "param_groups", "read_checkpoint", "read_metrics", "save_checkpoint", "set_seed",
           "train", "write_plot"]
