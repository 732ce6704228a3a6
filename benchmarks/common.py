"""Shared helpers for the benchmarks: paths, data, environment description, BENCHMARKS.md section updates."""
from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DELTATUNE_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"


def sst2_rows(split: str = "train", limit: int | None = None) -> list[tuple[str, int]]:
    """``(sentence, label)`` rows of GLUE SST-2 ``train`` or ``dev`` (header ``sentence\\tlabel``)."""
    rows = []
    with open(DATA / "glue" / "SST-2" / f"{split}.tsv") as f:
        next(f)
        for line in f:
            text, label = line.rstrip("\n").split("\t")
            rows.append((text, int(label)))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def machine() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({cpu}), no GPU, torch.get_num_threads()={torch.get_num_threads()}, "
            f"{platform.system()} {platform.machine()}")


def versions() -> str:
    import torch
    import transformers

    parts = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    try:
        import peft

        parts.append(f"peft {peft.__version__}")
    except ImportError:
        pass
    import deltatune

    parts.append(f"deltatune {deltatune.__version__}")
    parts.append(f"python {platform.python_version()}")
    return ", ".join(parts)


def command_line() -> str:
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
    return "python " + " ".join(shlex.quote(a) for a in [script, *sys.argv[1:]])


def header(title: str) -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (f"### {title}\n\n"
            f"- command: `{command_line()}` (from the repository root)\n"
            f"- date: {now}\n"
            f"- machine: {machine()}\n"
            f"- versions: {versions()}\n")


def update_section(key: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the block between ``<!-- key:start -->`` and ``<!-- key:end -->`` in BENCHMARKS.md."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text if text.endswith("\n") else text + "\n")


def publish(key: str, body: str) -> None:
    """Print a result section and put it into BENCHMARKS.md under ``key``."""
    print(body)
    update_section(key, body)


@dataclass
class Variant:
    """One timed training setup: the model, the AdamW on its trainable parameters (``None`` for the frozen floor)
    and the per-round step times."""
    name: str
    model: object
    opt: object
    trainable: int
    times: list = field(default_factory=list)  # per round, per step
    faults: int = 0  # minor page faults during the timed steps


def variant(name: str, model, lr: float = 1e-4) -> Variant:
    """``model`` in train mode with AdamW on the parameters that require grad (none: the floor)."""
    import torch

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr) if params else None
    return Variant(name, model, opt, sum(p.numel() for p in params))


def backward_step(v: Variant, loss) -> None:
    """``loss.backward()`` and, unless ``v`` is the floor, one optimizer step."""
    loss.backward()
    if v.opt is not None:
        v.opt.step()
        v.opt.zero_grad(set_to_none=True)


def rotating_rounds(variants: list, rounds: int, run, warmup=None, report=None) -> None:
    """``warmup(v)`` once per variant, then ``rounds`` rounds in which every variant runs once (``run(v, r)``),
    the order rotating from round to round (round ``r`` starts at variant ``r mod n``), so that drift of a shared
    machine and cache state fall on every variant alike; ``report(r)`` after each round."""
    import gc

    gc.collect()
    for v in variants:
        if warmup is not None:
            warmup(v)
    n = len(variants)
    for r in range(rounds):
        for v in variants[r % n:] + variants[:r % n]:
            run(v, r)
        if report is not None:
            report(r)


def md_table(header_row: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header_row) + " |", "|" + "|".join("---" for _ in header_row) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def memory_children(script: str, variants: list[str], steps: int) -> dict:
    """Run ``script --mem-child VARIANT --mem-steps STEPS`` in a fresh process per variant; each prints one JSON line
    last (its peak memory record). Returns ``{variant: record}``."""
    import json
    import subprocess

    out = {}
    for v in variants:
        cmd = [sys.executable, script, "--mem-child", v, "--mem-steps", str(steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[v] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  memory {v}: {out[v]}", file=sys.stderr, flush=True)
    return out
