#!/usr/bin/env python
"""Training step time of the merge-friendly methods on MiniLM-L6, relative to the floor and to PEFT.

Same protocol as ``bench_lora.py``: every variant in one process, interleaved rounds, the floor is the frozen model
with gradient flowing to the input embeddings. Batch 16, sequence 128, targets query/key/value/dense (all attention
and FFN linear layers), the classifier head trains in full in every variant, fp32, AdamW.

- ``lora``: ours, r=8 alpha=16 (reference point); ``peft_lora``: PEFT's;
- ``oft`` / ``oft_neumann``: ours, block size 32, exact Cayley / 5-term Neumann series;
  ``peft_oft``: PEFT ``OFTConfig(oft_block_size=32)`` (its default: Neumann, 5 terms);
- ``orthogonal``: Orthogonal Adaptation r=8 (frozen basis slot, only B trains);
- ``vera``: r=256; ``nola``: r=8, k_A = k_B = 64.

    python benchmarks/bench_orthogonal.py --rounds 8 --steps 3
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lora as BL  # noqa: E402
from common import header, md_table, update_section  # noqa: E402

import torch  # noqa: E402

import deltatune as dt  # noqa: E402

CFG = dict(BL.CONFIGS["minilm"])
HEAD = CFG["modules_to_save"]
METHODS = {
    "lora": lambda: dt.LoRA(r=8, alpha=16, targets=CFG["targets"], modules_to_save=HEAD),
    "oft": lambda: dt.OFT(block_size=32, targets=CFG["targets"], modules_to_save=HEAD),
    "oft_neumann": lambda: dt.OFT(block_size=32, cayley="neumann", targets=CFG["targets"], modules_to_save=HEAD),
    "orthogonal": lambda: dt.OrthogonalAdaptation(r=8, slot=0, targets=CFG["targets"], modules_to_save=HEAD),
    "vera": lambda: dt.VeRA(r=256, targets=CFG["targets"], modules_to_save=HEAD),
    "nola": lambda: dt.NOLA(r=8, k_A=64, k_B=64, targets=CFG["targets"], modules_to_save=HEAD),
}
VARIANTS = ("floor", *METHODS, "peft_lora", "peft_oft")


def build(name: str, base) -> BL.Variant:
    if name in ("floor", "peft_lora"):
        v = BL.build("floor" if name == "floor" else "peft", base, CFG)
        v.name = name
        return v
    model = copy.deepcopy(base)
    if name == "peft_oft":
        from peft import OFTConfig, get_peft_model

        model = get_peft_model(model, OFTConfig(oft_block_size=32, r=0, target_modules=CFG["targets"],
                                                modules_to_save=HEAD))
    elif name in METHODS:
        dt.attach(model, METHODS[name]())
    else:
        raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return BL.Variant(name, model, torch.optim.AdamW(params, lr=1e-4), sum(p.numel() for p in params))


def bench_speed(variants: list[str], rounds: int, steps: int, warmup: int) -> dict:
    base = BL.load_base("minilm")
    batches = BL.make_batches("minilm", CFG)
    vs = [build(n, base) for n in variants]
    del base
    return BL.run_rounds(vs, batches, rounds, steps, warmup)


def speed_table(res: dict) -> str:
    peer = {"lora": "peft_lora", "oft": "peft_oft", "oft_neumann": "peft_oft"}
    rows = []
    for n in res:
        cells = [n, f"{res[n]['trainable']:,}"]
        for den in ("floor", peer.get(n)):
            rr = BL.ratio(res, n, den) if den else None
            cells.append("-" if rr is None or n == den else f"**{rr[0]:.3f}** [{rr[1]:.3f}, {rr[2]:.3f}]"
                         + ("" if den == "floor" else f" ({den})"))
        rows.append(cells)
    return md_table(["variant", "trainable params", "step / floor step", "step / PEFT step"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--malloc", choices=["default", "retain"], default="retain",
                    help="glibc malloc as it comes, or deltatune.runtime.retain_freed_memory() for the whole process "
                         "(every variant; removes per-step page faults, the main source of noise here)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.malloc == "retain":
        from deltatune.runtime import retain_freed_memory

        assert retain_freed_memory(), "retain_freed_memory() did not apply on this system"
    variants = [v for v in args.variants.split(",") if v]
    res = bench_speed(variants, args.rounds, args.steps, args.warmup)
    body = "\n".join([
        header(f"Merge-friendly methods, training step: {CFG['label']}"),
        f"- setup: batch {CFG['batch']}, sequence length {CFG['seq']}, targets {'/'.join(CFG['targets'])}, "
        f"classifier trained in full, fp32, AdamW, glibc malloc {args.malloc}; {args.rounds} rounds x {args.steps} "
        "steps, interleaved in one process. Ratio of per-step medians in bold, [q25, q75] of the per-round ratios.\n",
        speed_table(res), ""])
    print(body)
    if not args.no_write:
        update_section("bench_orthogonal:speed", body)


if __name__ == "__main__":
    main()
