"""``deltatune`` command line: demo, train, inspect, export, merge, extract, compress."""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections import Counter
from pathlib import Path

import yaml
from safetensors import SafetensorError

from . import __version__
from .combine.merge import combine_records
from .compress import compress
from .deltas import delta_from_spec, structure_class
from .demo import run as run_demo
from .extract import extract
from .insight import plot_ranks
from .interference import pair_overlaps, summarize
from .io import NotLowRank, check_not_input, read_record, svd_error_summary, write_record
from .files import write_generation
from .io.weights import WeightStore
from .train import run_config
from .train.data import ColumnError, check_columns, read_rows
from .train.specs import COMPRESS_EXAMPLE, MERGE_EXAMPLE, Calibration, compress_config, merge_config


def _cmd_demo(args) -> int:
    run_demo(args.out, steps=args.steps, progress=not args.no_progress)
    return 0


def _cmd_train(args) -> int:
    result = run_config(args.config, trust_remote_code=args.trust_remote_code, resume_from=args.resume)
    if result["metrics_path"] is not None:  # rank 0 (under torchrun every rank runs this)
        summary = {k: v for k, v in result.items() if k != "history"}
        print(json.dumps(summary, indent=2, default=str))
    return 0


def describe(folder: str | Path) -> dict:
    """Summary of a saved adapter (either format): method, targets, per-module structure, shapes and parameters."""
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


def print_table(header: list[str], rows: list[list]) -> None:
    """``rows`` under ``header`` in left-aligned columns two spaces apart (trailing spaces stripped)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def _interference(args) -> int:
    """``inspect A --interference B ...``: overlaps of the saved adapters' subspaces, per layer and on average."""
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
    print_table(header, table)
    if skipped:
        print(f"skipped {sorted(skipped)} modules: their update depends on the base weight; use "
              "dt.interference(model, names) on a model", file=sys.stderr)
    return 0


def _cmd_inspect(args) -> int:
    if args.interference:
        return _interference(args)
    info = describe(args.adapter)
    if args.plot:
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
    # the layer kind says how to read the shape (a conv's is out x in/groups*kernel); shown unless all are Linear
    layer = ["layer"] if any(r["layer"] not in (None, "linear") for r in info["modules"]) else []
    header = ["module", "structure", *layer, "shape", *extra_keys, "params"]
    table = [[r["module"], r["structure"], *([r["layer"] or "linear"] if layer else []),
              "x".join(map(str, r["shape"])), *(_fmt(r.get(k, "")) for k in extra_keys), f"{r['params']:,}"]
             for r in info["modules"]]
    print_table(header, table)
    return 0


def _base_weights(path):
    """``base(module, spec)`` reading the base model's safetensors (``None`` without a path) and the store to close."""
    if path is None:
        return None, None
    store = WeightStore(path)
    return (lambda mod, spec: store.module_weight(mod, spec.get("layer") or "linear",
                                                  (spec["out_features"], spec["in_features"]))), store


def _report(errors: dict[str, float]) -> None:
    if errors:
        print(svd_error_summary(errors))


EXPORT_TARGETS = {"peft": "a PEFT LoRA checkpoint", "diffusers": "a diffusers LoRA file",
                  "kohya": "a kohya / A1111 LoRA file"}


def _cmd_export(args) -> int:
    if args.to not in EXPORT_TARGETS:
        raise ValueError(f"unknown export target {args.to!r}; supported: {', '.join(EXPORT_TARGETS)}")
    check_not_input(args.out, [args.adapter], "the adapter being exported")
    check_not_input(args.out, [args.base], "the base model")
    rec = read_record(args.adapter)
    base, store = _base_weights(args.base)
    try:
        errors = write_record(args.out, rec, format=args.to, rank=args.rank, energy=args.energy, base=base,
                              component=args.component or None)
    finally:
        if store is not None:
            store.close()
    print(f"wrote {EXPORT_TARGETS[args.to]} of {len(rec.modules)} modules to {args.out}")
    _report(errors)
    return 0


def _cmd_merge(args) -> int:
    cfg = merge_config(args.config)
    check_not_input(cfg.output, [a.path for a in cfg.adapters], "an adapter being merged")
    check_not_input(cfg.output, [cfg.base], "the base model")
    records = [read_record(a.path) for a in cfg.adapters]
    base, store = _base_weights(cfg.base)
    try:
        record, errors = combine_records(records, cfg.method, [a.weight for a in cfg.adapters], cfg.density,
                                         cfg.rank, cfg.energy, cfg.seed, cfg.name, base)
    finally:
        if store is not None:
            store.close()
    try:
        write_record(cfg.output, record, format=cfg.format)
    except NotLowRank as e:
        raise ValueError(f"{e}; in MERGE.yaml: add 'rank:' or 'energy:' to write the merge as a LoRA") from None
    structures = Counter(spec["structure"] for spec in record.modules.values())
    print(f"wrote {record.name!r} ({cfg.method} of {len(records)} adapters; " +
          ", ".join(f"{n} {s}" for s, n in structures.items()) + f" modules) to {cfg.output}")
    if cfg.rank is not None or cfg.energy is not None:
        _report(errors)
    return 0


def _cmd_extract(args) -> int:
    check_not_input(args.out, [args.base, args.tuned], "a model being read")
    record, report = extract(args.base, args.tuned, rank=args.rank, energy=args.energy, targets=args.targets,
                             exclude=args.exclude, name=args.name)
    write_record(args.out, record, format=args.to)
    print(f"wrote {args.to} adapter {record.name!r} to {args.out}")
    print(report.summary())
    return 0


def calibration_batches(cal: Calibration, tokenizer) -> list[dict]:
    """The calibration rows as causal-LM batches of one text each (``labels`` = ``input_ids``)."""
    rows = read_rows(cal.data, cal.samples)
    check_columns(rows, [cal.text], "calibration data")
    data = []
    for row in rows:
        b = dict(tokenizer(str(row[cal.text]), return_tensors="pt", truncation=True, max_length=cal.max_length))
        b["labels"] = b["input_ids"].clone()
        data.append(b)
    return data


def _cmd_compress(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer  # local: optional dependency, slow to import

    cfg = compress_config(args.config)
    check_not_input(cfg.output_dir, [cfg.model], "the model being compressed")
    model = AutoModelForCausalLM.from_pretrained(cfg.model).eval()
    data = None
    if cfg.calibration is not None:
        data = calibration_batches(cfg.calibration, AutoTokenizer.from_pretrained(cfg.model))
    before = sum(p.numel() for p in model.parameters())
    ranks = compress(model, ratio=cfg.ratio, method=cfg.method, data=data, targets=cfg.targets, exclude=cfg.exclude)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)  # fresh: tokenizing sets a max_length that would be saved

    def fill(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    write_generation(cfg.output_dir, fill)  # the whole folder at once: a kill leaves the old one or the new one
    after = sum(p.numel() for p in model.parameters())
    factored = [k for k in ranks.values() if k >= 0]
    print(f"wrote {cfg.output_dir}: {after:,} parameters ({after / before:.1%} of {before:,}); {len(factored)} of "
          f"{len(ranks)} layers factored, ranks {min(factored, default=0)}..{max(factored, default=0)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltatune", description="Fine-tune pretrained models with structured weight "
                                "deltas; save, inspect and export the adapters.")
    p.add_argument("--version", action="version", version=f"deltatune {__version__}")
    p.add_argument("--debug", action="store_true", help="show the traceback of errors too")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of errors too")
    sub = p.add_subparsers(dest="command", required=True)
    _add = sub.add_parser
    sub.add_parser = lambda *a, **k: _add(*a, parents=[common], **k)

    d = sub.add_parser("demo", help="fine-tune MiniLM with LoRA on an embedded dataset, save, reload, merge")
    d.add_argument("--out", default="deltatune-demo", help="output folder (default: ./deltatune-demo)")
    d.add_argument("--steps", type=int, default=None, help="cap the number of training steps")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=_cmd_demo)

    t = sub.add_parser("train", help="train an adapter from a YAML run config (see examples/)")
    t.add_argument("config", help="RUN.yaml")
    t.add_argument("--trust-remote-code", action="store_true", help="let the model folder's own Python code run "
                   "(transformers' trust_remote_code); a RUN.yaml cannot turn this on")
    t.add_argument("--resume", metavar="CHECKPOINT", default=None, help="continue from a checkpoint-<step> folder "
                   "(written with train.save_every), or 'last' for the newest one in output_dir")
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

    e = sub.add_parser("export", help="write an adapter in another format (a PEFT LoRA for any method)")
    e.add_argument("adapter", help="adapter folder")
    e.add_argument("--to", default="peft", choices=list(EXPORT_TARGETS),
                   help="target format: peft (default); diffusers (pytorch_lora_weights.safetensors for "
                   "pipe.load_lora_weights / load_lora_adapter); kohya (lora_unet_* keys, A1111 / ComfyUI)")
    e.add_argument("--component", default="unet", help="diffusers / kohya: the pipeline component the model is "
                   "(unet, transformer, text_encoder; default unet); '' for a model's own keys (diffusers)")
    how = e.add_mutually_exclusive_group()
    how.add_argument("--rank", type=int, default=None, help="rank for structures that are not a LoRA (sparse, "
                     "sliced, rotations, dense merges): truncated SVD, relative error reported")
    how.add_argument("--energy", type=float, default=None, help="instead of --rank: per module the fewest SVD "
                     "components holding this share of ||dW||^2 (e.g. 0.95)")
    e.add_argument("--base", metavar="MODEL", help="the base model's safetensors (file or folder); needed for "
                   "rotations (OFT), whose update depends on the base weight")
    e.add_argument("out", help="output folder")
    e.set_defaults(func=_cmd_export)

    m = sub.add_parser("merge", help="combine adapters of any structures (sum, TIES, DARE, ...) from a YAML",
                       epilog=MERGE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("config", help="MERGE.yaml")
    m.set_defaults(func=_cmd_merge)

    x = sub.add_parser("extract", help="extract a LoRA from a fully fine-tuned model and its base")
    x.add_argument("base", help="base model: safetensors file or model folder")
    x.add_argument("tuned", help="fine-tuned model: safetensors file or model folder")
    x.add_argument("out", help="output adapter folder")
    how = x.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="components per module")
    how.add_argument("--energy", type=float, help="per module the fewest components holding this share of ||dW||^2")
    x.add_argument("--targets", nargs="+", help="only these modules (names or suffixes; default every changed "
                   "weight matrix)")
    x.add_argument("--exclude", nargs="+", help="leave these modules out (names or suffixes)")
    x.add_argument("--to", default="peft", choices=["peft", "deltatune"], help="output format (default peft)")
    x.add_argument("--name", default="extracted", help="adapter name")
    x.set_defaults(func=_cmd_extract)

    c = sub.add_parser("compress", help="compress a causal LM by low-rank factorization (plain, activation-aware or "
                       "Fisher-weighted SVD) from a YAML", epilog=COMPRESS_EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("config", help="RUN.yaml")
    c.set_defaults(func=_cmd_compress)
    return p


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the input is wrong", not "deltatune is wrong": bad values and config files
    (``ValueError``, which covers JSON and Unicode decoding errors; config ``TypeError``s are turned into
    ``ValueError``s where the config is read), files and folders (``OSError``: missing, a file where a folder is
    wanted, permissions, a full disk), YAML syntax, unreadable safetensors, missing columns and missing optional
    packages. The CLI reports them in one line and exits 2; anything else is a bug (traceback, exit 1)."""
    return (ValueError, OSError, ColumnError, ModuleNotFoundError, yaml.YAMLError, SafetensorError)


BUG_HINT = ("this is a bug in deltatune, not in your input: please report it with the command line and the "
            "traceback above (deltatune --version: {version})")


def _one_line(e: BaseException) -> str:
    """The error's message on one line (a ``KeyError``'s without the quotes ``str`` adds)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command. User errors: one line ``deltatune <cmd>: error: ...`` on stderr, exit 2 (with ``--debug``
    also the traceback); bugs: the traceback and a hint to report it, exit 1; Ctrl-C: exit 130."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"deltatune {args.command}: interrupted", file=sys.stderr)
        return 130
    except user_errors() as e:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"deltatune {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        print(f"deltatune {args.command}: internal error: " +
              BUG_HINT.format(version=__version__), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
