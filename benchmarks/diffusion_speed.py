#!/usr/bin/env python
"""Conv LoRA training-step speed on a diffusers UNet: deltatune vs PEFT vs the frozen floor (issue 17, item 7).

Protocol (DESIGN.md, "Benchmark protocol"), as in ``bench_lora.py``:

- model: a randomly initialized ``diffusers.UNet2DConditionModel`` (speed only, so random weights are fine), two
  resolution levels (``block_out_channels=(64, 128)``, one cross-attention level), 16x16 latents with 4 channels,
  8 text tokens of width 64; fp32, train mode.
- a step is the DDPM training objective on a fixed batch: ``MSE(unet(x_t, t, text).sample, noise)``, backward,
  ``AdamW.step()`` on the adapter parameters and ``zero_grad()``.
- ``floor``: the same model with every weight frozen and ``x_t`` requiring grad, so the whole activation backward
  still runs (no weight gradients, no optimizer). No adapter method can be faster.
- ``ours``: ``dt.attach(unet, dt.LoRA(r, alpha, targets=names))``; ``peft``: ``peft.inject_adapter_in_model(
  LoraConfig(r, lora_alpha=alpha, lora_dropout=0, target_modules=names), unet)``. ``names`` is the same explicit
  list of module names for both: every ``nn.Conv2d`` and ``nn.Linear`` of the UNet (``--targets all``) or every
  ``nn.Conv2d`` only (``--targets conv``). Convolutions run as LoCon in both libraries (``A`` a conv with the
  base's kernel, ``B`` a 1x1 conv).
- speed: all variants live in ONE process (separate deep copies of one base), are warmed up, then timed in
  ``--rounds`` rounds of ``--steps`` steps each, the order rotating every round. Ratios of per-step medians:
  ``overhead = ours / floor``, ``vs_peft = ours / peft``; the brackets give the interquartile range of the same
  ratio computed round by round (the spread).
- memory (``--what speed,memory``): one fresh subprocess per variant runs ``--mem-steps`` steps; peak resident set
  (VmHWM, reset right before the first step) and its increase over the RSS before that step.

    python benchmarks/diffusion_speed.py --rounds 12 --steps 3
    python benchmarks/bench_diffusion.py --what speed          # the same, through the diffusion benchmark
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Variant, backward_step, header, md_table, rotating_rounds, update_section, variant  # noqa: E402,E501

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import deltatune as dt  # noqa: E402

UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=8,
            norm_num_groups=32)
TOKENS = 8
VARIANTS = ("floor", "ours", "peft")
TARGET_TYPES = {"all": (nn.Conv2d, nn.Linear), "conv": (nn.Conv2d,)}


# -- model, data, variants -------------------------------------------------------------------------------------------
def make_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET).float().train()


def target_names(unet: nn.Module, which: str) -> list[str]:
    """The same explicit target list for both libraries: every module of the chosen types."""
    return [n for n, m in unet.named_modules() if type(m) in TARGET_TYPES[which]]


def make_batches(batch: int, n: int = 3) -> list[dict]:
    """Fixed DDPM training batches: ``x_t`` of a random latent at a random timestep, the noise, text states."""
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(1)
    sched = DDPMScheduler(num_train_timesteps=1000)
    size = UNET["sample_size"]
    out = []
    for _ in range(n):
        x0 = torch.randn(batch, UNET["in_channels"], size, size, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        text = torch.randn(batch, TOKENS, UNET["cross_attention_dim"], generator=g)
        out.append({"x": sched.add_noise(x0, noise, t), "t": t, "text": text, "noise": noise})
    return out


def build(name: str, base: nn.Module, names: list[str], r: int, alpha: float) -> Variant:
    model = copy.deepcopy(base)
    if name == "floor":
        model.requires_grad_(False)
    elif name == "ours":
        dt.attach(model, dt.LoRA(r=r, alpha=alpha, dropout=0.0, targets=names), name="a")
    elif name == "peft":
        from peft import LoraConfig, inject_adapter_in_model

        model.requires_grad_(False)
        model = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=names),
                                        model)
    else:
        raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
    return variant(name, model)


def train_step(v: Variant, batch: dict) -> None:
    x = batch["x"].detach().requires_grad_(v.opt is None)  # the floor: the input's gradient runs the backward
    loss = F.mse_loss(v.model(x, batch["t"], batch["text"]).sample, batch["noise"])
    backward_step(v, loss)


# -- speed -----------------------------------------------------------------------------------------------------------
def time_steps(v: Variant, batches: list[dict], steps: int, first: int = 0) -> list[float]:
    import time

    ts = []
    for i in range(steps):
        batch = batches[(first + i) % len(batches)]
        t0 = time.perf_counter()
        train_step(v, batch)
        ts.append(time.perf_counter() - t0)
    return ts


def run_rounds(vs: list[Variant], batches: list[dict], rounds: int, steps: int, warmup: int) -> None:
    def report(r):
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{v.name} {statistics.median(v.times[-1]):.3f}s"
                                                      for v in vs), file=sys.stderr, flush=True)

    rotating_rounds(vs, rounds, lambda v, r: v.times.append(time_steps(v, batches, steps, first=r)),
                    warmup=lambda v: time_steps(v, batches, warmup), report=report)


def ratio(a: list[list[float]], b: list[list[float]]) -> tuple[float, float, float]:
    """``(ratio of per-step medians, q25, q75 of the per-round ratios of per-round medians)``."""
    med = lambda rounds: statistics.median(t for ts in rounds for t in ts)  # noqa: E731
    per_round = sorted(statistics.median(x) / statistics.median(y) for x, y in zip(a, b))
    q = statistics.quantiles(per_round, n=4) if len(per_round) >= 2 else [per_round[0]] * 3
    return med(a) / med(b), q[0], q[2]


def speed_table(vs: list[Variant]) -> str:
    by = {v.name: v for v in vs}
    rows = []
    for v in vs:
        cells = [v.name, f"{v.trainable:,}"]
        for den in ("floor", "peft"):
            if den not in by or den == v.name:
                cells.append("-")
            else:
                m, lo, hi = ratio(v.times, by[den].times)
                cells.append(f"**{m:.3f}** [{lo:.3f}, {hi:.3f}]")
        cells.append(f"({statistics.median(t for ts in v.times for t in ts):.3f} s)")
        rows.append(cells)
    return md_table(["variant", "trainable params", "step / floor step (overhead)", "step / PEFT step (vs_peft)",
                     "median step"], rows)


# -- memory ----------------------------------------------------------------------------------------------------------
def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def mem_child(args) -> None:
    base = make_unet()
    v = build(args.mem_child, base, target_names(base, args.targets), args.r, args.alpha)
    batches = make_batches(args.batch)
    del base
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak mark so that building the model does not set it
        f.write("5")
    before = _status_mb("VmRSS")
    for i in range(args.mem_steps):
        train_step(v, batches[i % len(batches)])
    print(json.dumps({"rss_before_mb": before, "peak_mb": _status_mb("VmHWM")}))


def memory_table(args, variants: list[str]) -> str:
    rows = []
    for name in variants:
        cmd = [sys.executable, __file__, "--mem-child", name, "--mem-steps", str(args.mem_steps), "--targets",
               args.targets, "--batch", str(args.batch), "--r", str(args.r), "--alpha", str(args.alpha),
               "--threads", str(args.threads)]
        m = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        print(f"  memory {name}: {m}", file=sys.stderr, flush=True)
        rows.append([name, f"{m['peak_mb']:.0f} MB", f"{m['peak_mb'] - m['rss_before_mb']:.0f} MB"])
    return md_table(["variant", "peak RSS during training", f"peak - RSS before step 1 ({args.mem_steps} steps)"],
                    rows)


# -- main ------------------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", choices=[*TARGET_TYPES, "both"], default="both",
                    help="all: every Conv2d and Linear; conv: every Conv2d; both: one table each")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds (each runs every variant)")
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the first round")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list out of " + ",".join(VARIANTS))
    ap.add_argument("--what", default="speed", help="comma list: speed, memory")
    ap.add_argument("--mem-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 is steadier on a shared machine)")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--mem-child", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.mem_child:
        mem_child(args)
        return
    what = set(args.what.split(","))
    variants = [v for v in args.variants.split(",") if v]
    base = make_unet()
    body = [header(f"Conv LoRA training step on a diffusers UNet2DConditionModel, {args.threads} thread(s)"),
            f"- model: `UNet2DConditionModel({', '.join(f'{k}={v!r}' for k, v in UNET.items())})`, random init, "
            f"{sum(p.numel() for p in base.parameters()):,} parameters; batch {args.batch} of "
            f"{UNET['in_channels']}x{UNET['sample_size']}x{UNET['sample_size']} latents, {TOKENS} text tokens; "
            f"DDPM noise-prediction MSE, AdamW on the adapters; LoRA r={args.r} alpha={args.alpha:g} dropout=0, fp32\n"]
    for which in (TARGET_TYPES if args.targets == "both" else [args.targets]):
        names = target_names(base, which)
        label = {"all": "every Conv2d and Linear", "conv": "every Conv2d"}[which]
        convs = sum(isinstance(base.get_submodule(n), nn.Conv2d) for n in names)
        print(f"[{which}] {len(names)} targets; {args.rounds} rounds x {args.steps} steps of {variants}",
              file=sys.stderr)
        if "speed" in what:
            vs = [build(n, base, names, args.r, args.alpha) for n in variants]
            run_rounds(vs, make_batches(args.batch), args.rounds, args.steps, args.warmup)
            body.append(f"Targets: {label} ({len(names)} modules, {convs} of them convolutions), the same explicit "
                        f"list for both libraries. {args.rounds} rounds x {args.steps} steps per variant after "
                        f"{args.warmup} warm-up steps, interleaved in one process; ratio of per-step medians in "
                        "bold, [q25, q75] of the per-round ratios (the spread), absolute median in parentheses "
                        "(noise on this shared machine; read the ratios).\n")
            body.append(speed_table(vs) + "\n")
            del vs
            gc.collect()
        if "memory" in what:
            args.targets = which
            body.append(f"Memory ({label}): one fresh process per variant.\n")
            body.append(memory_table(args, variants) + "\n")
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        update_section(f"bench_diffusion:speed:threads{args.threads}", text)


if __name__ == "__main__":
    main()
