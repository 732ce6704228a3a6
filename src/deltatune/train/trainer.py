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
import json
import math
import os
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

from .. import model as M
from ..hf import restore
from ..io import save
from ..io.files import (fsync_dir, read_json, read_tensors, write_file,
                        write_generation, write_json, write_tensors)
from ..io.state import join_state, split_state
from ..runtime import freed_memory_retained
from .data import IGNORE_INDEX, TASKS, Collator
from .fields import typed_fields

SCHEDULES = ("linear", "cosine", "constant")
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "metrics.png"


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
    params = [p for p in M.unwrap(model).parameters() if p.requires_grad]
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
    p = next(M.unwrap(model).parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# -- evaluation ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, task: str) -> dict[str, float]:
    """Evaluation metrics over ``loader``: ``eval_loss`` and ``eval_accuracy`` (classification) or
    ``eval_loss`` and ``eval_perplexity`` (causal LM, per response token). Under DDP each rank passes its own
    shard and the sums are combined, so every rank returns the metrics of the whole set."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    inner = M.unwrap(model)
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


# -- logging -------------------------------------------------------------------------------------------------------
_TRAIN_KEYS = {"step", "loss", "lr", "epoch", "time"}


def write_plot(records: list[dict], path: str | Path) -> Path | None:
    """Training loss, any ``eval_*`` metrics and any controller numbers (e.g. ``budget``, ``rank``) against step, as
    a PNG. ``None`` if matplotlib is missing."""
    try:  # a Figure with its own Agg canvas: pyplot and the user's backend stay untouched
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    keys = sorted({k for r in evals for k in r if k.startswith("eval_")})
    extra = sorted({k for r in train for k in r} - _TRAIN_KEYS)
    panels = 1 + len(keys) + (1 if extra else 0)
    fig = Figure(figsize=(5 * panels, 3.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if "eval_loss" in keys:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    for ax, key in zip(axes[1:], keys):
        ax.plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r], "o-")
        ax.set(xlabel="step", title=key)
    if extra:
        ax = axes[-1]
        for key in extra:
            ax.plot([r["step"] for r in train if key in r], [r[key] for r in train if key in r], label=key)
        ax.set(xlabel="step", title="controllers")
        ax.legend()
    fig.tight_layout()
    return write_file(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))


class _Log:
    """Metric records in memory; rank 0 also appends them to ``metrics.jsonl``.

    The file is never truncated: a run appends a ``{"run_start": ...}`` record and then one JSON line per record,
    written (and the file closed) as it comes, so a kill loses at most the line being written (a partial last line,
    which :func:`read_metrics` skips). A run into a folder with an earlier ``metrics.jsonl`` keeps the earlier runs'
    lines before its own.
    """

    def __init__(self, output_dir: Path | None, write: bool, records: Sequence[dict] = ()):
        self.records: list[dict] = list(records)
        self.path = output_dir / METRICS_NAME if output_dir is not None and write else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            self._write({RUN_START: time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            if created:
                fsync_dir(self.path.parent)

    def _write(self, record: dict) -> None:
        """Append one line (opened per record: nothing to close, and nothing buffered when the process dies)."""
        with open(self.path, "a+b") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a killed run's partial last line stays on a line of its own
                    f.write(b"\n")
            f.write((json.dumps(record) + "\n").encode("utf-8"))

    def add(self, record: dict) -> None:
        self.records.append(record)
        if self.path is not None:
            self._write(record)


RUN_START = "run_start"


def read_metrics(path: str | Path, runs: str = "last") -> list[dict]:
    """The records of ``metrics.jsonl``: those of the last run (``runs="last"``) or of all runs (``"all"``, with
    their ``run_start`` records). Lines that are not complete JSON objects (the last line of a killed run) are
    skipped."""
    if runs not in ("last", "all"):
        raise ValueError(f"runs must be 'last' or 'all', got {runs!r}")
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            if runs == "last" and RUN_START in record:
                records = []
            else:
                records.append(record)
    return records


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


# -- the loop ------------------------------------------------------------------------------------------------------
def _batches(loader: DataLoader) -> Iterator[dict]:
    """The loader's batches, epoch after epoch (reshuffled per epoch)."""
    epoch = 0
    while True:
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


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
    args.validate()
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if not len(train_data):
        raise ValueError("train_data is empty")
    if args.save_every and output_dir is None:
        raise ValueError("save_every writes checkpoints into output_dir: pass output_dir=...")
    resumed = read_checkpoint(resume_from) if resume_from is not None else None
    if resumed is not None:
        restore(model, Path(resume_from) / "adapter")
    adapted = M.REGISTRY_ATTR in M.unwrap(model).__dict__  # controllers run only on models with adapters
    rank, world = _dist()
    main = rank == 0
    collate_fn = collate_fn or Collator()
    output_dir = Path(output_dir) if output_dir is not None else None
    set_seed(args.seed)

    inner = M.unwrap(model)
    device = _device(inner)
    retain = device.type == "cpu" and args.retain_freed_memory
    with freed_memory_retained() if retain else contextlib.nullcontext():
        if world > 1:
            sampler = DistributedSampler(train_data, num_replicas=world, rank=rank, shuffle=args.shuffle,
                                         seed=args.seed)
        elif args.shuffle:
            sampler = RandomSampler(train_data, generator=torch.Generator().manual_seed(args.seed))
        else:
            sampler = SequentialSampler(train_data)
        loader = DataLoader(train_data, batch_size=args.batch_size, sampler=sampler, collate_fn=collate_fn,
                            num_workers=args.num_workers)
        evals = eval_loader(eval_data, args.eval_batch_size or args.batch_size, collate_fn) if eval_data else None

        total = args.max_steps or max(1, math.ceil(args.epochs * len(loader) / args.grad_accum))
        warmup = args.warmup_steps or int(args.warmup_ratio * total)
        optimizer = torch.optim.AdamW(param_groups(inner, args.weight_decay), lr=args.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, args.schedule))
        first = 0
        if resumed is not None:
            first = int(resumed["step"])
            if not 0 < first < total:
                raise ValueError(f"{resume_from} is at step {first}, but this run has {total} steps: nothing to resume")
            try:
                optimizer.load_state_dict(resumed["optimizer"])
            except ValueError as e:
                raise ValueError(f"{resume_from}: its optimizer state does not fit the adapters' parameters ({e}); "
                                 "resume with the same method and training arguments") from None
            scheduler.load_state_dict(resumed["scheduler"])
        net = nn.parallel.DistributedDataParallel(inner) if world > 1 else inner
        if adapted:  # shapes may change: this loop rebuilds its DDP wrapper when they do
            M.begin(inner, total, resizable=True, step=first)

        log = _Log(output_dir, main, resumed["history"] if resumed is not None else ())
        bar = None
        if main and args.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=first, desc="train", dynamic_ncols=True)

        was_training = inner.training
        inner.train()
        stream = _batches(loader)
        for _ in range(first * args.grad_accum):  # the same data order as the uninterrupted run
            next(stream)
        if resumed is not None:
            torch.set_rng_state(resumed["rng"])
            if "cuda_rng" in resumed and device.type == "cuda":
                torch.cuda.set_rng_state(resumed["cuda_rng"], device)
        start, window, last_eval = time.perf_counter(), [], None
        for step in range(first, total):
            micro = [next(stream) for _ in range(args.grad_accum)]
            items = _all_sum([sum(count_items(b, task) for b in micro)], device)[0]
            if items == 0:
                raise ValueError("a training step has no items with labels (every response token masked?)")
            step_loss = 0.0
            for i, batch in enumerate(micro):
                inputs, labels = _split(_to(batch, device))
                defer_sync = world > 1 and i < len(micro) - 1  # DDP all-reduces on the last micro-batch only
                with net.no_sync() if defer_sync else contextlib.nullcontext():
                    loss, _ = loss_sum(_logits(net(**inputs)), labels, task)
                    (loss * (world / items)).backward()
                step_loss += loss.item()
            if args.max_grad_norm:  # read the groups each step: a controller may have changed them
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                               args.max_grad_norm)
            if adapted:
                M.after_backward(inner, optimizer)
            optimizer.step()
            if adapted and M.step(inner, optimizer) and world > 1:
                del net  # parameters changed shape: DDP's buckets must be rebuilt
                net = nn.parallel.DistributedDataParallel(inner)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            step_loss = _all_sum([step_loss], device)[0] / items
            window.append(step_loss)
            done = step + 1
            if done % args.log_every == 0 or done == total:
                log.add({"step": done, "loss": sum(window) / len(window), "lr": lr,
                         "epoch": done * args.grad_accum / len(loader), "time": time.perf_counter() - start,
                         **(M.controller_metrics(inner) if adapted else {})})
                window = []
            if evals is not None and ((args.eval_every and done % args.eval_every == 0) or done == total):
                last_eval = evaluate(inner, evals, task)
                log.add({"step": done, **last_eval, "time": time.perf_counter() - start})
            if main and args.save_every and done % args.save_every == 0 and done < total:
                save_checkpoint(output_dir / f"{CHECKPOINT_PREFIX}{done}", inner, optimizer, scheduler, done,
                                log.records)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}")
        if bar is not None:
            bar.close()
        inner.train(was_training)

        result = {"steps": total, "train_loss": next((r["loss"] for r in reversed(log.records) if "loss" in r), None),
                  "eval": last_eval, "history": log.records, "time": time.perf_counter() - start, "world_size": world,
                  "metrics_path": None, "plot_path": None, "adapter_path": None}
        if main and output_dir is not None:
            result["metrics_path"] = str(log.path)
            if args.plot:
                plot = write_plot(log.records, output_dir / PLOT_NAME)
                result["plot_path"] = str(plot) if plot else None
            if args.save_adapter and adapted:
                result["adapter_path"] = str(save(inner, output_dir / "adapter"))
        if world > 1:
            dist.barrier()
        return result


__all__ = ["TrainArgs", "evaluate", "eval_loader", "loss_sum", "lr_factor", "param_groups", "read_checkpoint",
           "read_metrics", "save_checkpoint", "set_seed", "train", "write_plot"]
