"""``deltatune`` command line: demo, train, inspect, export."""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from .train.data import ColumnError


def _cmd_demo(args) -> int:
    from .demo import run

    run(args.out, steps=args.steps, progress=not args.no_progress)
    return 0


def _cmd_train(args) -> int:
    from .train import run_config

    result = run_config(args.config)
    if result["metrics_path"] is not None:  # rank 0 (under torchrun every rank runs this)
        summary = {k: v for k, v in result.items() if k != "history"}
        print(json.dumps(summary, indent=2, default=str))
    return 0


def describe(folder: str | Path) -> dict:
    """Summary of a saved adapter (either format): method, targets, per-module structure, shapes and parameters."""
    from .io import read_record

    rec = read_record(folder)
    rows = []
    for mod, spec in rec.modules.items():
        n = sum(t.numel() for t in rec.tensors[mod].values() if t.is_floating_point())
        detail = {k: v for k, v in spec.items() if k not in ("structure", "layer", "out_features", "in_features")}
        rows.append({"module": mod, "structure": spec["structure"], "layer": spec.get("layer"),
                     "shape": [spec["out_features"], spec["in_features"]], "params": n, **detail})
    return {"name": rec.name, "method": rec.method, "base_model": rec.base_model, "task_type": rec.task_type,
            "modules": rows, "params": rec.num_parameters()}


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _interference(args) -> int:
    """``inspect A --interference B ...``: overlaps of the saved adapters' subspaces, per layer and on average."""
    from .deltas import delta_from_spec, structure_class
    from .interference import pair_overlaps, summarize
    from .io import read_record

    folders = [args.adapter, *args.interference]
    deltas, skipped = {}, set()
    for folder in folders:
        rec = read_record(folder)
        name = rec.name if rec.name not in deltas else str(folder)
        deltas[name] = {}
        for mod, spec in rec.modules.items():
            if structure_class(spec["structure"]).needs_base:  # relative to the base weight, which a checkpoint lacks
                skipped.add(spec["structure"])
                continue
            deltas[name][mod] = delta_from_spec(spec, rec.tensors[mod])
    rows = pair_overlaps(deltas, args.energy)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ["module", "a", "b", "rank_a", "rank_b", "input_overlap", "output_overlap"]
    table = [[_fmt(r[k]) for k in header] for r in rows]
    for (a, b), m in summarize(rows).items():
        table.append(["mean", a, b, f"{m['rank_a']:.1f}", f"{m['rank_b']:.1f}", _fmt(m["input_overlap"]),
                      _fmt(m["output_overlap"])])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    for row in [header, *table]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
    if skipped:
        print(f"skipped {sorted(skipped)} modules: their update depends on the base weight; use "
              "dt.interference(model, names) on a model", file=sys.stderr)
    return 0


def _cmd_inspect(args) -> int:
    if args.interference:
        return _interference(args)
    info = describe(args.adapter)
    if args.plot:
        from .insight import plot_ranks
        from .io import read_record

        rec = read_record(args.adapter)
        print(f"wrote {plot_ranks(rec.modules, args.plot, title=f'{rec.name}: rank per layer and module')}",
              file=sys.stderr)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    method = dict(info["method"])
    print(f"adapter   {info['name']}")
    print(f"method    {method.pop('method', '?')}  " + "  ".join(f"{k}={v}" for k, v in method.items()
                                                            if v not in (None, {}, []) and k != "targets"))
    print(f"base      {info['base_model'] or 'unknown'}  (task {info['task_type'] or 'unknown'})")
    structures = Counter(r["structure"] for r in info["modules"])
    print(f"modules   {len(info['modules'])} (" + ", ".join(f"{n} {s}" for s, n in structures.items()) + ")")
    print(f"params    {info['params']:,}")
    extra_keys = sorted({k for r in info["modules"] for k in r} - {"module", "structure", "layer", "shape", "params"})
    header = ["module", "structure", "shape", *extra_keys, "params"]
    table = [[r["module"], r["structure"], "x".join(map(str, r["shape"])),
              *(_fmt(r.get(k, "")) for k in extra_keys), f"{r['params']:,}"] for r in info["modules"]]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    for row in [header, *table]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
    return 0


def _cmd_export(args) -> int:
    from .io import read_record, svd_error_summary, write_record

    if args.to != "peft":
        raise SystemExit(f"unknown export target {args.to!r}; supported: peft")
    rec = read_record(args.adapter)
    errors = write_record(args.out, rec, format="peft", rank=args.rank)
    print(f"wrote a PEFT LoRA checkpoint of {len(rec.modules)} modules to {args.out}")
    if errors:
        print(svd_error_summary(errors))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltatune", description="Fine-tune pretrained models with structured weight "
                                "deltas; save, inspect and export the adapters.")
    p.add_argument("--version", action="version", version=f"deltatune {__import__('deltatune').__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="fine-tune MiniLM with LoRA on an embedded dataset, save, reload, merge")
    d.add_argument("--out", default="deltatune-demo", help="output folder (default: ./deltatune-demo)")
    d.add_argument("--steps", type=int, default=None, help="cap the number of training steps")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=_cmd_demo)

    t = sub.add_parser("train", help="train an adapter from a YAML run config (see examples/)")
    t.add_argument("config", help="RUN.yaml")
    t.set_defaults(func=_cmd_train)

    i = sub.add_parser("inspect", help="show an adapter's method, targets, per-module shapes, ranks and parameters")
    i.add_argument("adapter", help="adapter folder (deltatune or PEFT format)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--plot", metavar="PNG", help="also draw the rank of every module as a layer x type heatmap")
    i.add_argument("--interference", nargs="+", metavar="OTHER",
                   help="compare with other adapter folders: per-layer overlap of input and output subspaces")
    i.add_argument("--energy", type=float, default=0.99,
                   help="with --interference: share of ||dW||^2 that defines each subspace (default 0.99)")
    i.set_defaults(func=_cmd_inspect)

    e = sub.add_parser("export", help="write an adapter in another format")
    e.add_argument("adapter", help="adapter folder")
    e.add_argument("--to", default="peft", help="target format (peft)")
    e.add_argument("--rank", type=int, default=None,
                   help="rank for structures that are not a LoRA (sparse, sliced): truncated SVD, error reported")
    e.add_argument("out", help="output folder")
    e.set_defaults(func=_cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError, ColumnError) as e:
        print(f"deltatune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
