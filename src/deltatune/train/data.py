"""Training data: read rows from files, tokenize them for one of two tasks, pad batches.

Rows are plain dicts (column name -> value). Sources (:func:`read_rows`):

- ``.jsonl``: one JSON object per line;
- ``.json``: a list of objects;
- ``.csv`` / ``.tsv``: a header line with column names (TSV is read without quote handling, as GLUE needs), or,
  for a file without one (GLUE's CoLA), ``columns=[...]`` naming its fields;
- a ``datasets.Dataset`` (Python API), or a ``load_dataset``-style mapping of local files,
  ``{"dataset": "csv" | "json" | "parquet" | "text" | "arrow", "data_files": ..., "split": "train"}``, read with
  ``datasets.load_dataset`` (:data:`LOCAL_BUILDERS` only: data sets are never downloaded). ``datasets`` is an
  optional dependency (``pip install deltatune[data]``), imported only for these sources.

Tasks:

- ``classification``: ``text`` (and optionally ``text_pair``) column(s) plus a ``label`` column. Labels that are
  all integers (or integer strings, as read from CSV) are used as they are; anything else is mapped to ids in
  sorted order (:func:`label_map`).
- ``causal_lm``: instruction tuning. The prompt is a column or a template over several columns, the response a
  column; the example is ``prompt tokens + response tokens + eos`` and the labels are ``-100`` on the prompt (and
  on padding), so the loss is on the response only.

An encoded example is a dict of lists (``input_ids``, ``attention_mask``, maybe ``token_type_ids``) plus
``labels`` (an int for classification, a list for causal LM). :class:`Collator` pads a list of them into tensors.
"""
from __future__ import annotations

import csv
import glob
import itertools
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100


class ColumnError(KeyError):
    """A row lacks a column that the task or a prompt template needs."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""
FILE_TYPES = (".jsonl", ".json", ".csv", ".tsv")
# datasets' packaged builders that read local files (no hub, no pickle: not "pandas")
LOCAL_BUILDERS = ("csv", "json", "parquet", "text", "arrow")
# keys of a load_dataset-style spec: the builder, its local files, the split, and the builders' reading options
SPEC_KEYS = ("dataset", "data_files", "split", "delimiter", "column_names", "quoting", "field")
TASKS = ("classification", "causal_lm")

# Named prompt templates. A template is a str.format string over row columns, or a pair
# (with_input, without_input) chosen by whether the row's "input" column is empty (the Alpaca convention).
TEMPLATES: dict[str, str | tuple[str, str]] = {
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
}


# -- reading files ---------------------------------------------------------------------------------------------
def read_rows(path, max_rows: int | None = None, columns: Sequence[str] | None = None) -> list[dict]:
    """Rows of a source: a ``.jsonl``, ``.json`` (list of objects), ``.csv`` or ``.tsv`` file, a ``datasets.Dataset``
    or a ``load_dataset``-style spec of local files (see the module docstring and :func:`check_spec`).

    ``max_rows`` keeps the first rows only (jsonl/csv/tsv files are not read further). ``columns``: the field names
    of a ``.csv`` / ``.tsv`` file that has no header line (its first line is then data).
    """
    if isinstance(path, dict):
        return _spec_rows(check_spec(path), max_rows)
    if is_dataset(path):
        if columns is not None:
            raise ValueError("data.columns names the fields of a headerless .csv/.tsv file; a datasets.Dataset has "
                             "its own column names")
        return _dataset_rows(path, max_rows)
    if not isinstance(path, (str, Path)):
        raise TypeError(f"a data source is a file path, a datasets.Dataset or a load_dataset-style mapping "
                        f"{{dataset: csv, data_files: ...}}, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise ValueError(f"cannot read {str(path)!r}: unsupported file type {suffix or '(none)'!r}; "
                         f"use one of {', '.join(FILE_TYPES)}")
    if columns is not None and suffix not in (".csv", ".tsv"):
        raise ValueError(f"data.columns names the fields of a headerless .csv/.tsv file; {str(path)!r} is "
                         f"{suffix}, whose rows name their own fields")
    with open(path, encoding="utf-8-sig", newline="") as f:
        if suffix == ".json":
            rows = _json_rows(f, path)
        elif suffix == ".jsonl":
            rows = _jsonl_rows(f, path)
        else:
            rows = _table_rows(f, path, tsv=suffix == ".tsv", columns=columns)
        return list(itertools.islice(rows, max_rows))


def _json_rows(f, path: Path) -> list[dict]:
    data = json.load(f)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{str(path)!r} must hold a JSON list of objects (one per row)")
    return data


def _jsonl_rows(f, path: Path) -> Iterator[dict]:
    for lineno, line in enumerate(f, 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"{str(path)!r} line {lineno}: expected a JSON object, got {type(row).__name__}")
            yield row


def _table_rows(f, path: Path, tsv: bool, columns: Sequence[str] | None = None) -> Iterator[dict]:
    """CSV with standard quoting; TSV without quote handling (GLUE files contain bare quote characters). With
    ``columns`` the file has no header: every line is a row of exactly those fields."""
    if columns is not None:
        columns = check_column_names(columns)
    reader = csv.DictReader(f, fieldnames=columns, delimiter="\t" if tsv else ",",
                            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    what = f"data.columns {columns}" if columns else f"the header {reader.fieldnames}"
    for row in reader:
        if None in row or None in row.values():
            raise ValueError(f"{str(path)!r} line {reader.line_num}: the number of fields differs from {what}")
        if columns and reader.line_num == 1 and list(row.values()) == columns:
            raise ValueError(f"{str(path)!r} has a header line {columns}; data.columns is for files without one: "
                             "remove data.columns")
        yield row


def check_column_names(columns) -> list[str]:
    """``data.columns`` as a list of distinct, non-empty strings."""
    if isinstance(columns, str) or not isinstance(columns, Sequence) or not columns or \
            not all(isinstance(c, str) and c for c in columns):
        raise ValueError(f"data.columns must be a non-empty list of column names (the fields of a headerless "
                         f"file, in order), got {columns!r}")
    if len(set(columns)) != len(columns):
        raise ValueError(f"data.columns {list(columns)} repeats a name")
    return list(columns)


# -- datasets (optional dependency, imported only for these sources) ------------------------------------------------
def is_dataset(obj) -> bool:
    """Whether ``obj`` is a ``datasets.Dataset`` / ``IterableDataset`` (``datasets`` is not imported for this: a
    user who has one has imported it)."""
    mod = sys.modules.get("datasets")
    return mod is not None and isinstance(obj, (mod.Dataset, mod.IterableDataset))


def _dataset_rows(ds, max_rows: int | None) -> list[dict]:
    mod = sys.modules["datasets"]
    if isinstance(ds, mod.Dataset):
        return (ds if max_rows is None else ds.select(range(min(max_rows, len(ds))))).to_list()
    return [dict(r) for r in itertools.islice(ds, max_rows)]


def _datasets():
    try:
        import datasets  # optional dependency: only load_dataset-style sources need it
    except ImportError:
        raise ModuleNotFoundError("a {dataset: ..., data_files: ...} data source needs the datasets package: "
                                  "pip install 'deltatune[data]' (or give the file path itself)") from None
    return datasets


def check_spec(spec: dict, base: Path | None = None) -> dict:
    """A ``load_dataset``-style spec, checked to name local files only, with ``data_files`` resolved against
    ``base`` (default: as given). ``dataset`` must be one of :data:`LOCAL_BUILDERS` (a hub name such as ``glue`` is
    refused: nothing is downloaded); every ``data_files`` entry must name existing local files (globs allowed)."""
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in the data source {spec}; allowed: {list(SPEC_KEYS)}")
    builder = spec.get("dataset")
    if builder not in LOCAL_BUILDERS:
        raise ValueError(f"data source dataset={builder!r}: deltatune reads local files only and never downloads a "
                         f"data set; give one of {list(LOCAL_BUILDERS)} with data_files naming your files (download "
                         "a hub data set yourself first)")
    files = spec.get("data_files")
    if files is None:
        raise ValueError(f"the data source {spec} needs data_files (a local file, a list, or {{split: files}})")

    def local(f):
        if not isinstance(f, (str, Path)) or "://" in str(f):
            raise ValueError(f"data_files entry {f!r} must be a local path (no URLs or hf:// paths)")
        p = Path(os.path.expanduser(str(f)))
        p = p if p.is_absolute() or base is None else base / p
        if not glob.glob(str(p)):
            raise FileNotFoundError(f"data_files entry {str(p)!r} matches no file")
        return str(p)

    if isinstance(files, dict):
        files = {k: [local(f) for f in (v if isinstance(v, list) else [v])] for k, v in files.items()}
    else:
        files = [local(f) for f in (files if isinstance(files, list) else [files])]
    return {**spec, "data_files": files}


def _spec_rows(spec: dict, max_rows: int | None) -> list[dict]:
    datasets = _datasets()
    options = {k: v for k, v in spec.items() if k not in ("dataset", "data_files", "split")}
    ds = datasets.load_dataset(spec["dataset"], data_files=spec["data_files"], split=spec.get("split", "train"),
                               **options)
    return _dataset_rows(ds, max_rows)


def describe_source(source) -> str:
    """A data source as messages name it: the path, the spec, or ``datasets.Dataset (N rows)``."""
    if is_dataset(source):
        n = len(source) if hasattr(source, "__len__") else "?"
        return f"{type(source).__name__} ({n} rows)"
    return str(source)


def check_columns(rows: Sequence[dict], columns: Sequence[str | None], source: str = "data") -> None:
    """Raise ``KeyError`` naming the first column (of the non-None ``columns``) missing from some row."""
    if not rows:
        raise ValueError(f"{source} has no rows")
    for i, row in enumerate(rows):
        for col in columns:
            if col is not None and col not in row:
                hint = ""
                if str(source).lower().endswith((".csv", ".tsv")):
                    hint = " (if the file has no header line, name its fields in order: data.columns: [...])"
                raise ColumnError(f"{source}: row {i} has no column {col!r}; columns present: {sorted(row)}{hint}")


# -- classification ----------------------------------------------------------------------------------------------
def _as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def label_key(value) -> str:
    """A label as the key of a label map: integers (``1``, ``"1"``, ``" 1"``) as their decimal string, anything
    else as ``str(value)``."""
    i = _as_int(value)
    return str(i) if i is not None else str(value)


def label_map(labels: Sequence) -> dict[str, int]:
    """``{label key: id}``. Non-negative integer labels keep their value; other labels get ids in sorted order."""
    ints = [_as_int(v) for v in labels]
    if all(i is not None and i >= 0 for i in ints):
        return {str(i): i for i in sorted(set(ints))}
    return {name: i for i, name in enumerate(sorted({label_key(v) for v in labels}))}


def encode_classification(
    rows: Sequence[dict],
    tokenizer,
    text: str,
    label: str,
    text_pair: str | None = None,
    max_length: int = 128,
    label2id: dict[str, int] | None = None,
    source: str = "data",
) -> tuple[list[dict], dict[str, int]]:
    """Tokenize classification rows. Returns ``(examples, label2id)``; ``label2id`` is built from the rows unless
    given (pass the training set's map when encoding the evaluation set)."""
    check_columns(rows, [text, text_pair, label], source)
    label2id = label2id or label_map([r[label] for r in rows])
    unknown = sorted({label_key(r[label]) for r in rows} - set(label2id))
    if unknown:
        raise ValueError(f"{source}: labels {unknown[:5]} are not in the label map {sorted(label2id)}")
    texts = [str(r[text]) for r in rows]
    pairs = [str(r[text_pair]) for r in rows] if text_pair else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    examples = [{k: enc[k][i] for k in keys} | {"labels": label2id[label_key(r[label])]} for i, r in enumerate(rows)]
    return examples, label2id


# -- causal LM instruction tuning --------------------------------------------------------------------------------
def format_prompt(row: dict, template: str | tuple[str, str], source: str = "data") -> str:
    """Fill a template (a format string, a named template from :data:`TEMPLATES`, or a (with_input, no_input)
    pair) with the row's columns."""
    template = TEMPLATES.get(template, template) if isinstance(template, str) else template
    if isinstance(template, (tuple, list)):
        with_input, without_input = template
        template = with_input if str(row.get("input") or "").strip() else without_input
    try:
        return template.format(**row)
    except KeyError as e:
        raise ColumnError(f"{source}: the prompt template uses column {e.args[0]!r}, which the row lacks; "
                       f"columns present: {sorted(row)}") from None


def encode_instruction(prompt: str, response: str, tokenizer, max_length: int = 512) -> dict:
    """One causal-LM example: ``prompt + response + eos``, truncated to ``max_length`` at the end, with labels
    ``-100`` on the prompt tokens. Prompt and response are tokenized separately, so the boundary is exact."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; causal-LM examples end with one")
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p + r)[:max_length]
    labels = ([IGNORE_INDEX] * len(p) + r)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def encode_instructions(
    rows: Sequence[dict],
    tokenizer,
    response: str,
    prompt: str | None = None,
    template: str | tuple[str, str] | None = None,
    max_length: int = 512,
    source: str = "data",
) -> list[dict]:
    """Tokenize instruction rows (prompt column *or* template, plus response column). Rows whose prompt fills
    ``max_length`` (no response token left to learn from) are dropped with a warning."""
    if (prompt is None) == (template is None):
        raise ValueError("give exactly one of prompt (a column) or template (a format string over columns)")
    check_columns(rows, [prompt, response], source)
    examples = []
    for row in rows:
        text = str(row[prompt]) if prompt else format_prompt(row, template, source)
        ex = encode_instruction(text, str(row[response]), tokenizer, max_length)
        if any(t != IGNORE_INDEX for t in ex["labels"]):
            examples.append(ex)
    dropped = len(rows) - len(examples)
    if not examples:
        raise ValueError(f"{source}: every prompt is at least max_length={max_length} tokens; raise max_length")
    if dropped:
        warnings.warn(f"{source}: dropped {dropped} of {len(rows)} rows whose prompt fills max_length={max_length}")
    return examples


# -- batching --------------------------------------------------------------------------------------------------------
@dataclass
class Collator:
    """Pad a list of encoded examples on the right to the longest one: ``input_ids`` with ``pad_id``, masks and
    token types with 0, sequence labels with -100; integer labels become a 1-D tensor."""

    pad_id: int = 0

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(ex["input_ids"]) for ex in examples)
        fill = {"input_ids": self.pad_id, "labels": IGNORE_INDEX}
        batch = {}
        for key in examples[0]:
            values = [ex[key] for ex in examples]
            if isinstance(values[0], (list, tuple)):
                pad = fill.get(key, 0)
                values = [list(v) + [pad] * (width - len(v)) for v in values]
            batch[key] = torch.tensor(values)
        return batch


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id (padded positions are masked out anyway), else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


__all__ = ["Collator", "ColumnError", "IGNORE_INDEX", "LOCAL_BUILDERS", "TEMPLATES", "check_column_names",
           "check_columns", "check_spec", "describe_source", "is_dataset", "encode_classification",
           "encode_instruction", "encode_instructions", "format_prompt", "label_key", "label_map", "pad_id_of", "read_rows"]
