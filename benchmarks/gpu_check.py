#!/usr/bin/env python
"""The GPU check (issue 19 item 6): one short script to run whenever a CUDA machine is lent (under 8 minutes).

1. **Fused nodes vs the generic path** on the device, fp32 and bf16 autocast: for LoRA (``lowrank_linear``), S2FT
   blocks (``sliced_linear``), SpIEL entries (``sparse_linear``), OFT (``rotated_linear``) and LoCon
   (``locon_conv``), the output and the adapter gradients of the fused node against the same layer forced onto
   the generic path (a no-op forward hook on the base makes the layer call ``base(x)`` and add the delta):
   relative errors.
2. **Mixed-adapter serving** on the device: LoRA, S2FT and OFT adapters in one batch against each adapter run
   alone on its rows (max abs error), plus routed training gradients against the sum of per-adapter runs.
3. **Step time vs PEFT** on SmolLM2-135M in bf16 (batch 16, sequence 1024 by default): LoRA r=16, AdaLoRA, OFT
   (deltatune and PEFT, same settings, interleaved rounds, ``torch.cuda.synchronize`` around each step), S2FT
   (deltatune only); the ratios ours / PEFT.

Results: markdown on stdout and, with ``--write``, the ``gpu-check`` section of BENCHMARKS.md (marked with the
device name). ``--quick`` shrinks everything (a CPU smoke test: ``python benchmarks/gpu_check.py --device cpu
--quick``).

    python benchmarks/gpu_check.py --write
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, md_table, update_section  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import deltatune as dt  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# -- 1. fused vs generic ---------------------------------------------------------------------------------------------
STRUCTURES = {  # name: (method, the fused node's autograd name)
    "lora": (lambda: dt.LoRA(r=8, targets="all-linear"), "_LowRankLinearBackward"),
    "lora-dropout": (lambda: dt.LoRA(r=8, dropout=0.1, targets="all-linear"), "_LowRankLinearBackward"),
    "s2ft": (lambda: dt.S2FT(v_ratio=0.1, o_ratio=0.1, u_ratio=0.05, d_ratio=0.05), "_SlicedLinearBackward"),
    "spiel": (lambda: dt.SpIEL(density=0.05, targets="all-linear"), "_SparseLinearBackward"),
    "oft": (lambda: dt.OFT(block_size=32, targets=["q_proj", "v_proj"]), "_RotatedLinearBackward"),
    "locon": (lambda: dt.LoRA(r=8, targets="all-conv"), "_LoConConvBackward"),
}


def graph_names(t: torch.Tensor) -> set[str]:
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo.extend(f for f, _ in fn.next_functions)
    return {fn.name() for fn in seen}


def small_model(name: str, args) -> tuple[nn.Module, torch.Tensor]:
    """A real one-layer SmolLM2 (linears) or a small conv net, and an input for it."""
    g = torch.Generator().manual_seed(2)
    if name == "locon":
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.GELU(), nn.Conv2d(64, 16, 3, padding=1))
        return m.to(args.device), torch.randn(8, 16, 32, 32, generator=g).to(args.device)
    from transformers import AutoModelForCausalLM

    from deltatune.zoo import smollm2_path

    m = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    m.model.layers = m.model.layers[:1]
    return m.to(args.device), torch.randint(100, 5000, (4, 64 if args.quick else 512), generator=g).to(args.device)


def fused_vs_generic(args) -> list[list[str]]:
    """Each structure once on the fused path and once forced onto the generic one (a no-op forward hook on every
    adapted base layer); whether the fused node is in the first graph and absent from the second is reported too
    (OFT computes the whole output itself on both, and LoCon has no bf16 node: those rows compare like with like)."""
    rows = []
    for name, (method, node) in STRUCTURES.items():
        for dtype in ("fp32", "bf16"):
            outs, grads, ran = [], [], []
            for forced in (False, True):
                m, x = small_model(name, args)
                dt.attach(m, method(), name="a")
                g = torch.Generator().manual_seed(1)
                with torch.no_grad():
                    for d in dt.deltas(m, "a").values():
                        for p in d.parameters():
                            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))
                handles = [layer.base.register_forward_hook(lambda mod, i, o: None)
                           for _, layer in dt.model.adapted_layers(m)] if forced else []
                m.train() if name == "lora-dropout" else m.eval()
                torch.manual_seed(3)
                with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    out = m(x) if name == "locon" else m(input_ids=x).logits
                ran.append(node in graph_names(out))
                out.float().pow(2).mean().backward()
                outs.append(out.detach())
                grads.append([p.grad.detach().clone() for p in m.parameters() if p.requires_grad])
                for h in handles:
                    h.remove()
            err_out = rel(outs[0], outs[1])
            err_grad = max(rel(a, b) for a, b in zip(grads[0], grads[1]))
            tol = 1e-4 if dtype == "fp32" else 3e-2
            verdict = "ok" if err_out < tol and err_grad < tol else "MISMATCH"
            rows.append([name, dtype, "yes" if ran[0] else "no", "yes" if ran[1] else "no", f"{err_out:.1e}",
                         f"{err_grad:.1e}", verdict])
    return rows


# -- 2. mixed-adapter serving and routed training ----------------------------------------------------------------------
def mixed_batches(args) -> list[list[str]]:
    from transformers import AutoModelForCausalLM

    from deltatune.zoo import smollm2_path

    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).to(args.device).eval()
    if args.quick:  # two layers are enough for a smoke test
        model.model.layers = model.model.layers[:2]
    methods = {"lora": dt.LoRA(r=8, targets=["q_proj", "v_proj"]), "s2ft": dt.S2FT(v_ratio=0.05, o_ratio=0.05),
               "oft": dt.OFT(block_size=32, targets=["q_proj"])}
    g = torch.Generator().manual_seed(0)
    for name, method in methods.items():
        dt.attach(model, method, name=name, activate=False)
        with torch.no_grad():
            for d in dt.deltas(model, name).values():
                for p in d.parameters():
                    p.add_((torch.randn(p.shape, generator=g) * 0.01).to(p.device, p.dtype))
    names = ["lora", "s2ft", "oft", None, "lora", "s2ft"]
    ids = torch.randint(100, 5000, (len(names), 64 if args.quick else 256), generator=g).to(args.device)
    rows = []
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        worst = 0.0
        for n in set(names):
            r = [i for i, a in enumerate(names) if a == n]
            with dt.adapter_rows(model, [n] * len(r)):
                alone = model(input_ids=ids[r]).logits
            worst = max(worst, float((mixed[r] - alone).abs().max()))
    rows.append(["serving (eval, no grad)", f"{worst:.1e}", "ok" if worst < 1e-3 else "MISMATCH"])
    model.train()
    dt.set_active(model, list(methods))
    params = [p for p in model.parameters() if p.requires_grad]
    model(input_ids=ids, adapter_names=names).logits.float().pow(2).mean().backward()
    together = [p.grad.clone() for p in params]
    model.zero_grad()
    for n in methods:
        r = [i for i, a in enumerate(names) if a == n]
        out = model(input_ids=ids[r], adapter_names=[n] * len(r)).logits.float()
        (out.pow(2).sum() / (len(names) * out[0].numel())).backward()
    err = max(rel(a, p.grad) for a, p in zip(together, params) if p.grad is not None and p.grad.abs().max() > 0)
    rows.append(["routed training gradients", f"{err:.1e}", "ok" if err < 1e-3 else "MISMATCH"])
    return rows


# -- 3. step time vs PEFT -----------------------------------------------------------------------------------------------
def step_times(args) -> tuple[list[list[str]], dict]:
    from peft import AdaLoraConfig, LoraConfig, OFTConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from deltatune.zoo import smollm2_path

    base = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.bfloat16)
    if args.quick:
        base.model.layers = base.model.layers[:2]
    total = 100
    ours = {"lora": dt.LoRA(r=16, alpha=32, targets="all-linear"),
            "adalora": dt.AdaLoRA(init_r=12, target_r=8, targets="all-linear", total_step=total),
            "oft": dt.OFT(block_size=32, targets=["q_proj", "v_proj"]),
            "s2ft": dt.S2FT(v_ratio=0.01, o_ratio=0.01, u_ratio=0.01, d_ratio=0.01)}
    theirs = {"lora": LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0),
              "adalora": AdaLoraConfig(init_r=12, target_r=8, target_modules="all-linear", total_step=total,
                                       lora_dropout=0.0),
              "oft": OFTConfig(oft_block_size=32, r=0, target_modules=["q_proj", "v_proj"])}
    variants = {}
    for name, method in ours.items():
        m = copy.deepcopy(base).to(args.device)
        dt.attach(m, method, name=name)
        variants[f"ours-{name}"] = m
        if name in theirs:
            variants[f"peft-{name}"] = get_peft_model(copy.deepcopy(base), theirs[name]).to(args.device)
    seq = 128 if args.quick else args.seq
    batch = 2 if args.quick else args.batch
    ids = torch.randint(100, 5000, (batch, seq), generator=torch.Generator().manual_seed(0)).to(args.device)
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for k, m in
            variants.items()}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def step(k):
        m = variants[k]
        m.train()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opts[k].step()
        if k.startswith("ours"):
            dt.step(m, opts[k])
        opts[k].zero_grad(set_to_none=True)

    for k in variants:
        step(k)
        step(k)
    times = {k: [] for k in variants}
    keys = list(variants)
    for r in range(2 if args.quick else args.rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            sync()
            t0 = time.perf_counter()
            step(k)
            sync()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for name in ours:
        o, p = med[f"ours-{name}"], med.get(f"peft-{name}")
        rows.append([name, f"{o * 1000:.1f}", f"{p * 1000:.1f}" if p else "-", f"{o / p:.2f}" if p else "-"])
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if args.device.startswith("cuda") else float("nan")
    return rows, {"median_s": med, "peak_gib_all_variants": mem, "batch": batch, "seq": seq}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--skip", nargs="*", default=[], choices=["fused", "mixed", "speed"])
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--write", action="store_true", help="put the results into BENCHMARKS.md (section gpu-check)")
    args = p.parse_args(argv)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({args.device})"
    parts = [header(f"GPU check (issue 19): {device}"), ""]
    raw = {"device": device}
    if "fused" not in args.skip:
        rows = fused_vs_generic(args)
        raw["fused"] = rows
        parts += ["Fused nodes vs the generic path (relative errors; tolerance 1e-4 fp32, 3e-2 bf16):", "",
                  md_table(["structure", "dtype", "fused node (fused run)", "fused node (forced generic run)",
                           "output", "worst gradient", "verdict"], rows), ""]
    if "mixed" not in args.skip:
        rows = mixed_batches(args)
        raw["mixed"] = rows
        parts += ["Mixed-adapter batches on the device (SmolLM2-135M, fp32; LoRA, S2FT, OFT and base rows):", "",
                  md_table(["check", "error", "verdict"], rows), ""]
    if "speed" not in args.skip:
        rows, info = step_times(args)
        raw["speed"] = info
        parts += [f"Training step, SmolLM2-135M bf16, batch {info['batch']} x {info['seq']} (median ms, interleaved):",
                  "", md_table(["method", "deltatune ms", "PEFT ms", "ours / PEFT"], rows), ""]
    body = "\n".join(parts)
    print(body)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1, default=str) + "\n")
    if args.write:
        update_section("gpu-check", body)


if __name__ == "__main__":
    main()
