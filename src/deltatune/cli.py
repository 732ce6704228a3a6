"""``deltatune`` command line: demo, train, inspect, export, merge, extract, compress."""
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

    result = run_config(args.config, trust_remote_code=args.trust_remote_code, resume_from=args.resume)
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


def _base_weights(path):
    """``base(module, spec)`` reading the base model's safetensors (``None`` without a path) and the store to close."""
    if path is None:
        return None, None
    from .io.weights import WeightStore

    store = WeightStore(path)
    return (lambda mod, spec: store.module_weight(mod, spec.get("layer") or "linear",
                                                  (spec["out_features"], spec["in_features"]))), store


def _report(errors: dict[str, float]) -> None:
    from .io import svd_error_summary

    if errors:
        print(svd_error_summary(errors))


def _cmd_export(args) -> int:
    from .io import check_not_input, read_record, write_record

    if args.to != "peft":
        raise ValueError(f"unknown export target {args.to!r}; supported: peft")
    check_not_input(args.out, [args.adapter], "the adapter being exported")
    check_not_input(args.out, [args.base], "the base model")
    rec = read_record(args.adapter)
    base, store = _base_weights(args.base)
    try:
        errors = write_record(args.out, rec, format="peft", rank=args.rank, energy=args.energy, base=base)
    finally:
        if store is not None:
            store.close()
    print(f"wrote a PEFT LoRA checkpoint of {len(rec.modules)} modules to {args.out}")
    _report(errors)
    return 0


MERGE_KEYS = {"method", "adapters", "density", "rank", "energy", "seed", "name", "base", "output", "format"}


def read_merge_config(path: str | Path) -> dict:
    """A ``MERGE.yaml`` (see ``deltatune merge --help``) as a checked dict; paths are relative to the file."""
    import yaml

    from .train.config import _resolve

    path = Path(path)
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a mapping with keys {sorted(MERGE_KEYS)}")
    unknown = set(cfg) - MERGE_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(MERGE_KEYS)}")
    for key in ("adapters", "output"):
        if key not in cfg:
            raise ValueError(f"{path}: missing {key!r} (see deltatune merge --help for an example)")
    if not isinstance(cfg["adapters"], list) or not cfg["adapters"]:
        raise ValueError(f"{path}: 'adapters' must be a list of adapter folders (or {{path, weight}} mappings)")
    adapters = []
    for a in cfg["adapters"]:
        entry = {"path": a, "weight": 1.0} if isinstance(a, str) else dict(a) if isinstance(a, dict) else {}
        if not isinstance(entry.get("path"), str) or set(entry) - {"path", "weight"}:
            raise ValueError(f"{path}: each adapter is a folder, or a mapping with 'path' and optional 'weight'; "
                             f"got {a!r}")
        entry["path"] = Path(_resolve(entry["path"], path.parent))
        adapters.append(entry)
    cfg["adapters"] = adapters
    for key in ("output", "base"):
        if cfg.get(key) is not None:
            if not isinstance(cfg[key], str):
                raise ValueError(f"{path}: {key!r} must be a path, got {cfg[key]!r}")
            cfg[key] = Path(_resolve(cfg[key], path.parent))
    if cfg.get("format", "deltatune") not in ("deltatune", "peft"):
        raise ValueError(f"{path}: format must be 'deltatune' or 'peft', got {cfg['format']!r}")
    if cfg.get("format") == "peft" and cfg.get("method", "sum") != "sum" and cfg.get("rank") is None \
            and cfg.get("energy") is None:
        raise ValueError(f"{path}: a {cfg['method']} merge is a dense update; format: peft needs 'rank:' or "
                         "'energy:' to write it as a LoRA")
    return cfg



def _cmd_merge(args) -> int:
    from .combine.merge import combine_records
    from .io import NotLowRank, check_not_input, read_record, write_record

    cfg = read_merge_config(args.config)
    check_not_input(cfg["output"], [a["path"] for a in cfg["adapters"]], "an adapter being merged")
    check_not_input(cfg["output"], [cfg.get("base")], "the base model")
    records = [read_record(a["path"]) for a in cfg["adapters"]]
    base, store = _base_weights(cfg.get("base"))
    try:
        record, errors = combine_records(records, cfg.get("method", "sum"), [a.get("weight", 1.0) for a in
                                         cfg["adapters"]], cfg.get("density"), cfg.get("rank"), cfg.get("energy"),
                                         cfg.get("seed", 0), cfg.get("name", "merged"), base)
    finally:
        if store is not None:
            store.close()
    try:
        write_record(cfg["output"], record, format=cfg.get("format", "deltatune"))
    except NotLowRank as e:
        raise ValueError(f"{e}; in MERGE.yaml: add 'rank:' or 'energy:' to write the merge as a LoRA") from None
    structures = Counter(spec["structure"] for spec in record.modules.values())
    print(f"wrote {record.name!r} ({cfg.get('method', 'sum')} of {len(records)} adapters; " +
          ", ".join(f"{n} {s}" for s, n in structures.items()) + f" modules) to {cfg['output']}")
    if cfg.get("rank") is not None or cfg.get("energy") is not None:
        _report(errors)
    return 0


def _cmd_extract(args) -> int:
    from .extract import extract
    from .io import check_not_input, write_record

    check_not_input(args.out, [args.base, args.tuned], "a model being read")
    record, report = extract(args.base, args.tuned, rank=args.rank, energy=args.energy, targets=args.targets,
                             exclude=args.exclude, name=args.name)
    write_record(args.out, record, format=args.to)
    print(f"wrote {args.to} adapter {record.name!r} to {args.out}")
    print(report.summary())
    return 0


COMPRESS_KEYS = {"model", "ratio", "method", "calibration", "targets", "exclude", "output_dir"}
COMPRESS_EXAMPLE = """example RUN.yaml (paths relative to the file):

  model: {path: smollm2}          # minilm / smollm2 (packaged) or a model folder
  ratio: 0.2                      # fraction of the model's parameters to remove
  method: activation              # svd | activation | fisher
  calibration: {data: ../../shared/data/alpaca/alpaca_5000.json, text: output, samples: 32, max_length: 256}
  targets: all-linear
  output_dir: smollm2-compressed  # save_pretrained folder; load it with dt.load_compressed(folder)
"""


def _cmd_compress(args) -> int:
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .compress import compress
    from .io import check_not_input
    from .io.files import write_generation
    from .train.config import _resolve, model_path
    from .train.data import check_columns, read_rows

    path = Path(args.config)
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}  # parse errors name the file
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a mapping with keys {sorted(COMPRESS_KEYS)}")
    unknown = set(cfg) - COMPRESS_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(COMPRESS_KEYS)}")
    for key in ("model", "ratio", "output_dir"):
        if key not in cfg:
            raise ValueError(f"{path}: missing {key!r} (see deltatune compress --help for an example)")
    folder = model_path((cfg["model"] or {}).get("path", ""), path.parent)
    out = Path(_resolve(cfg["output_dir"], path.parent))
    check_not_input(out, [folder], "the model being compressed")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    method = cfg.get("method", "activation")
    data = None
    if method != "svd":
        cal = cfg.get("calibration") or {}
        if "data" not in cal:
            raise ValueError(f"{path}: method {method!r} needs calibration: {{data: FILE, text: COLUMN}}")
        tok = AutoTokenizer.from_pretrained(folder)
        rows = read_rows(_resolve(cal["data"], path.parent), cal.get("samples", 32))
        column = cal.get("text", "text")
        check_columns(rows, [column], "calibration data")
        data = []
        for row in rows:
            b = dict(tok(str(row[column]), return_tensors="pt", truncation=True, max_length=cal.get("max_length", 256)))
            b["labels"] = b["input_ids"].clone()
            data.append(b)
    before = sum(p.numel() for p in model.parameters())
    ranks = compress(model, ratio=float(cfg["ratio"]), method=method, data=data, targets=cfg.get("targets", "all-linear"),
                     exclude=cfg.get("exclude"))
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def fill(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    write_generation(out, fill)  # the whole folder at once: a kill leaves the old one or the new one
    after = sum(p.numel() for p in model.parameters())
    factored = [k for k in ranks.values() if k >= 0]
    print(f"wrote {out}: {after:,} parameters ({after / before:.1%} of {before:,}); {len(factored)} of {len(ranks)} "
          f"layers factored, ranks {min(factored, default=0)}..{max(factored, default=0)}")
    return 0


MERGE_EXAMPLE = """example MERGE.yaml (paths relative to the file):

  method: ties            # sum (task arithmetic) | ties | dare | dare_ties | magnitude
  adapters:               # deltatune or PEFT adapter folders; weight defaults to 1
    - {path: sst2, weight: 1.0}
    - {path: mrpc, weight: 0.5}
  density: 0.2            # kept fraction for ties / dare / magnitude
  rank: 16                # re-factorize to a LoRA of this rank (or energy: 0.95); omit both for an exact merge
  output: merged          # folder to write
  format: peft            # deltatune (default) or peft
  base: base_model_dir    # only for OFT rotations and kept-whole heads: the base model's safetensors
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltatune", description="Fine-tune pretrained models with structured weight "
                                "deltas; save, inspect and export the adapters.")
    p.add_argument("--version", action="version", version=f"deltatune {__import__('deltatune').__version__}")
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
    e.add_argument("--to", default="peft", help="target format (peft)")
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
    import yaml
    from safetensors import SafetensorError

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
    import traceback

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
              BUG_HINT.format(version=__import__("deltatune").__version__), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
