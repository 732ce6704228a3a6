"""The YAML files of ``deltatune merge`` (``MERGE.yaml``) and ``deltatune compress`` (``RUN.yaml``), read and
checked: :func:`merge_config` and :func:`compress_config` return dataclasses with absolute paths (relative ones are
relative to the file's folder); every error names the file and the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..util import resolve_path
from .config import model_path
from .fields import typed_fields

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

COMPRESS_EXAMPLE = """example RUN.yaml (paths relative to the file):

  model: {path: smollm2}          # minilm / smollm2 (packaged) or a model folder
  ratio: 0.2                      # fraction of the model's parameters to remove
  method: activation              # svd | activation | fisher
  calibration: {data: ../../shared/data/alpaca/alpaca_5000.json, text: output, samples: 32, max_length: 256}
  targets: all-linear
  output_dir: smollm2-compressed  # save_pretrained folder; load it with dt.load_compressed(folder)
"""


@dataclass
class MergeInput:
    """One adapter of a merge: its folder (deltatune or PEFT format) and its weight."""

    path: Path
    weight: float = 1.0


@dataclass
class MergeConfig:
    """A checked ``MERGE.yaml``: the arguments of :func:`~deltatune.combine.merge.combine_records` and where to
    write the result (``format``: ``deltatune`` or ``peft``)."""

    adapters: list  # of MergeInput
    output: Path
    method: str = "sum"
    density: float | None = None
    rank: int | None = None
    energy: float | None = None
    seed: int = 0
    name: str = "merged"
    base: Path | None = None  # the base model's safetensors (rotations, kept-whole heads)
    format: str = "deltatune"


@dataclass
class Calibration:
    """The ``calibration`` section of a compress ``RUN.yaml``: the first ``samples`` rows of file ``data``, column
    ``text``, tokenized up to ``max_length`` tokens."""

    data: str
    text: str = "text"
    samples: int = 32
    max_length: int = 256


@dataclass
class CompressConfig:
    """A checked compress ``RUN.yaml``: the arguments of :func:`~deltatune.compress.compress`, the model folder and
    the output folder; ``calibration`` is ``None`` for ``method: svd``, which reads no data."""

    model: str
    ratio: float
    output_dir: Path
    method: str = "activation"
    calibration: Calibration | None = None
    targets: object = "all-linear"
    exclude: object = None


def _keys(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def read_mapping(path: Path, keys: list[str], command: str, required: tuple[str, ...]) -> dict:
    """The YAML file ``path`` as a mapping of ``keys`` only, with every ``required`` key present (YAML parse errors
    name the file themselves)."""
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a mapping with keys {sorted(keys)}")
    unknown = set(cfg) - set(keys)
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(keys)}")
    for key in required:
        if key not in cfg:
            raise ValueError(f"{path}: missing {key!r} (see deltatune {command} --help for an example)")
    return cfg


def _merge_input(entry, path: Path) -> MergeInput:
    """``FOLDER`` or ``{path: FOLDER, weight: W}`` -> a :class:`MergeInput` with the folder resolved."""
    d = {"path": entry} if isinstance(entry, str) else dict(entry) if isinstance(entry, dict) else {}
    if not isinstance(d.get("path"), str) or set(d) - {"path", "weight"}:
        raise ValueError(f"{path}: each adapter is a folder, or a mapping with 'path' and optional 'weight'; "
                         f"got {entry!r}")
    d = typed_fields(MergeInput, d, "adapter key", f" in {path}")
    return MergeInput(**{**d, "path": Path(resolve_path(d["path"], path.parent))})


def _folder(cfg: dict, key: str, path: Path) -> Path | None:
    """``cfg[key]`` as a folder path resolved against the file's folder; ``None`` when left out."""
    if cfg.get(key) is None:
        return None
    if not isinstance(cfg[key], str):
        raise ValueError(f"{path}: {key!r} must be a path, got {cfg[key]!r}")
    return Path(resolve_path(cfg[key], path.parent))


def merge_config(path: str | Path) -> MergeConfig:
    """A ``MERGE.yaml`` (see :data:`MERGE_EXAMPLE`, ``deltatune merge --help``) as a checked :class:`MergeConfig`;
    paths are relative to the file. A non-sum merge written as ``format: peft`` needs ``rank`` or ``energy``
    (it is a dense update)."""
    path = Path(path)
    raw = read_mapping(path, _keys(MergeConfig), "merge", ("adapters", "output"))
    if not isinstance(raw["adapters"], list) or not raw["adapters"]:
        raise ValueError(f"{path}: 'adapters' must be a list of adapter folders (or {{path, weight}} mappings)")
    values = {**raw, "adapters": [_merge_input(a, path) for a in raw["adapters"]]}
    values.update(output=_folder(raw, "output", path), base=_folder(raw, "base", path))
    cfg = MergeConfig(**typed_fields(MergeConfig, values, "key", f" in {path}"))
    if cfg.format not in ("deltatune", "peft"):
        raise ValueError(f"{path}: format must be 'deltatune' or 'peft', got {cfg.format!r}")
    if cfg.format == "peft" and cfg.method != "sum" and cfg.rank is None and cfg.energy is None:
        raise ValueError(f"{path}: a {cfg.method} merge is a dense update; format: peft needs 'rank:' or "
                         "'energy:' to write it as a LoRA")
    return cfg


def _calibration(raw, method: str, path: Path) -> Calibration:
    """The ``calibration`` section, which every method but ``svd`` needs, with its data file resolved."""
    cal = raw or {}
    if not isinstance(cal, dict) or "data" not in cal:
        raise ValueError(f"{path}: method {method!r} needs calibration: {{data: FILE, text: COLUMN}}")
    cal = typed_fields(Calibration, cal, "calibration key", f" in {path}")
    return Calibration(**{**cal, "data": resolve_path(cal["data"], path.parent)})


def compress_config(path: str | Path) -> CompressConfig:
    """A compress ``RUN.yaml`` (see :data:`COMPRESS_EXAMPLE`, ``deltatune compress --help``) as a checked
    :class:`CompressConfig`; ``model.path`` is a model folder or a packaged model (:func:`model_path`), paths are
    relative to the file."""
    path = Path(path)
    raw = read_mapping(path, _keys(CompressConfig), "compress", ("model", "ratio", "output_dir"))
    model = raw["model"] or {}
    if not isinstance(model, dict):
        raise ValueError(f"{path}: 'model' must be a mapping {{path: FOLDER}}, got {model!r}")
    for key in ("ratio", "output_dir"):
        if raw[key] is None:
            raise ValueError(f"{path}: missing {key!r} (see deltatune compress --help for an example)")
    values = {**raw, "model": model_path(model.get("path", ""), path.parent),
              "output_dir": Path(resolve_path(raw["output_dir"], path.parent))}
    method = raw.get("method", "activation")
    values["calibration"] = _calibration(raw.get("calibration"), method, path) if method != "svd" else None
    return CompressConfig(**typed_fields(CompressConfig, values, "key", f" in {path}"))


__all__ = ["COMPRESS_EXAMPLE", "Calibration", "CompressConfig", "MERGE_EXAMPLE", "MergeConfig", "MergeInput",
           "compress_config", "merge_config", "read_mapping"]
