"""The training metrics: ``metrics.jsonl`` (appended record by record, never truncated) and ``metrics.png``.

A training record is ``{"step", "loss", "lr", "epoch", "time"}`` plus the controllers' numbers (e.g. AdaLoRA's
``budget`` and ``rank``); an evaluation record is ``{"step", "eval_...", "time"}``; each run starts with a
``{"run_start": <time>}`` record.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from ..files import fsync_dir, write_file

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "metrics.png"
RUN_START = "run_start"

_TRAIN_KEYS = {"step", "loss", "lr", "epoch", "time"}


def write_plot(records: list[dict], path: str | Path) -> Path | None:
    """Training loss, any ``eval_*`` metrics and any controller numbers (e.g. ``budget``, ``rank``) against step, as
    a PNG. ``None`` if matplotlib is missing."""
    try:  # matplotlib is optional; a Figure with its own Agg canvas: pyplot and the user's backend stay untouched
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


class MetricsLog:
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


__all__ = ["METRICS_NAME", "MetricsLog", "PLOT_NAME", "RUN_START", "read_metrics", "write_plot"]
