"""YAML run configs: one file describes model, data, method and training; :func:`run_config` runs it.

.. code-block:: yaml

    model:  {path: minilm, task: classification}           # or a local folder; "smollm2" for SmolLM2-135M
    data:   {train: data/train.tsv, eval: data/dev.tsv, text: sentence, label: label, max_length: 64}
    method: {name: lora, r: 8, alpha: 16, targets: all-linear}
    train:  {lr: 5.0e-4, batch_size: 16, max_steps: 100, eval_every: 50}
    output_dir: runs/sst2

Sections and their keys:

- ``model``: ``path`` (local folder, or ``minilm`` / ``smollm2`` from :mod:`deltatune.zoo`; never the hub),
  ``task`` (``classification`` | ``causal_lm``), ``num_labels`` (default: from the training labels), ``dtype``
  (``float32`` | ``bfloat16`` | ``float16``), ``config`` (overrides of the model config, e.g.
  ``{hidden_dropout_prob: 0.0}``; keys that run code from the model folder, ``trust_remote_code`` and
  ``code_revision``, need the caller's ``--trust-remote-code`` / ``trust_remote_code=True``; loading options that
  reach the network or unpickle, such as ``revision``, ``token`` or ``local_files_only``, are refused).
- ``data``: ``train``, ``eval`` (file paths; or ``{dataset: csv|json|parquet|text|arrow, data_files: ..., split:
  train}`` read with ``datasets.load_dataset`` from local files only; in Python also a ``datasets.Dataset``),
  ``columns`` (the field names of headerless ``.csv`` / ``.tsv`` files such as GLUE's CoLA), ``max_length``,
  ``max_train_rows``, ``max_eval_rows``; for classification ``text``,
  ``text_pair``, ``label``; for causal LM ``response`` plus ``prompt`` (a column) or ``template`` (a format string
  over columns, or ``alpaca``). See :mod:`deltatune.train.data`.
- ``method``: ``name`` (``lora``, ``pissa``, ``milora``, ``olora``, ``adalora``, ``increlora``, ``sora``) and that
  method's fields. For classification the head (``classifier`` / ``score``) is added to ``modules_to_save`` unless
  already listed.
- ``train``: the fields of :class:`~deltatune.train.trainer.TrainArgs`.
- ``output_dir`` (required), ``name`` (adapter name, default ``default``).

Relative paths in a config file are relative to the file's folder (for a dict: to the working directory).
Under ``torchrun`` the process group is initialized (gloo on CPU, nccl on GPU) if the caller has not done so, and
with CUDA each process trains on its own GPU (``LOCAL_RANK``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn

from .. import model as M
from .. import zoo
from ..files import write_text
from ..layers import is_linear
from ..methods.base import ALIASES, Method, check_fields
from ..targets import name_matches
from ..util import resolve_path
from .data import (TASKS, Collator, check_column_names, check_spec, describe_source, encode_classification,
                   encode_instructions, is_dataset, pad_id_of, read_rows)
from .fields import typed_fields
from .trainer import TrainArgs, last_checkpoint, set_seed, train

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# model.config keys that make from_pretrained run Python code shipped with the model folder: refused unless the
# caller (not the config file) trusts it: `deltatune train RUN.yaml --trust-remote-code`, run_config(...,
# trust_remote_code=True)
CODE_KEYS = ("trust_remote_code", "code_revision")
# loading options that are no model-config field: they would reach the network (hub revisions, tokens, downloads,
# hub attention kernels), unpickle weights (.bin, TF/Flax checkpoints) or load other adapters. A run config loads
# local files only, so they are always refused.
LOADING_KEYS = ("local_files_only", "revision", "token", "use_auth_token", "force_download", "resume_download",
                "proxies", "cache_dir", "mirror", "use_safetensors", "weights_only", "from_tf", "from_flax",
                "adapter_kwargs", "adapter_name", "_adapter_model_path", "gguf_file", "_commit_hash")
HEADS = ("classifier", "score")
DEFAULT_MAX_LENGTH = {"classification": 128, "causal_lm": 512}


@dataclass
class ModelConfig:
    path: str
    task: str = "classification"
    num_labels: int | None = None
    dtype: str | None = None
    config: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    train: object  # a file path, a load_dataset-style mapping of local files, or (Python API) a datasets.Dataset
    eval: object = None
    text: str | None = None
    text_pair: str | None = None
    label: str = "label"
    prompt: str | None = None
    response: str | None = None
    template: str | None = None
    max_length: int | None = None
    max_train_rows: int | None = None
    max_eval_rows: int | None = None
    columns: list | None = None  # field names of headerless .csv/.tsv files


@dataclass
class RunConfig:
    """A validated run config with absolute paths."""

    model: ModelConfig
    data: DataConfig
    method: Method
    train: TrainArgs
    output_dir: Path
    name: str = "default"


# -- parsing and validation -----------------------------------------------------------------------------------
def _section(cls, d, where: str):
    """Build dataclass ``cls`` from mapping ``d``; unknown, missing or mistyped keys raise ``ValueError``."""
    if not isinstance(d, dict):
        raise ValueError(f"config section {where!r} must be a mapping, got {type(d).__name__}")
    values = typed_fields(cls, d, "key", f" in {where!r}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if d.get(k) is None]
    if missing:
        raise ValueError(f"{where!r} needs {missing}")
    return cls(**values)


def parse_method(d: dict | None) -> Method:
    """``{name: lora, r: 8, ...}`` -> the method config; unknown fields raise ``ValueError``."""
    d = dict(d or {"name": "lora"})
    name = d.pop("name", None)
    if name is None:
        raise ValueError("config section 'method' needs 'name' (e.g. lora, pissa, milora, olora)")
    method = Method.from_dict({"method": name, **d})
    allowed = ["name"] + [f.name for f in dataclasses.fields(method)]
    d = {ALIASES.get(k, k) if k not in allowed else k: v for k, v in d.items()}  # PEFT's names (lora_alpha, ...)
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for method {name!r}; allowed: {allowed}")
    try:  # numbers and flags of the wrong type are config errors (ValueError), not a TypeError deep inside
        method = type(method)(**typed_fields(type(method), d, "key", " in 'method'"))
        check_fields(method)
        method.validate()
    except TypeError as e:
        raise ValueError(f"config section 'method': {e}") from e
    return method



def _resolve_source(source, base: Path, where: str):
    """A data source with relative paths resolved: a file path, a checked load_dataset-style mapping
    (:func:`~deltatune.train.data.check_spec`) or a ``datasets.Dataset`` as it is."""
    if source is None or is_dataset(source):
        return source
    if isinstance(source, dict):
        return check_spec(source, base)
    if isinstance(source, (str, Path)):
        return resolve_path(source, base)
    raise ValueError(f"{where} must be a file path or a mapping {{dataset: csv|json|parquet, data_files: ...}} "
                     f"(Python: also a datasets.Dataset), got {type(source).__name__}")


def model_path(path: str, base: Path) -> str:
    """A local model folder; ``minilm`` and ``smollm2`` name the packaged models of :mod:`deltatune.zoo`."""
    named = {"minilm": zoo.minilm_path, "smollm2": zoo.smollm2_path}
    if str(path) in named:
        return str(named[str(path)]())
    folder = Path(resolve_path(path, base))
    if not folder.is_dir():
        raise FileNotFoundError(f"model.path {str(folder)!r} is not a folder; give a local model folder or one of "
                                f"{sorted(named)} (models are never downloaded)")
    return str(folder)


def check_model_config(overrides, trust_remote_code: bool = False, where: str = "the run config") -> None:
    """Refuse ``model.config`` keys that run code (:data:`CODE_KEYS`, unless ``trust_remote_code``) or that are
    loading options reaching the network or unpickling (:data:`LOADING_KEYS`, and ``attn_implementation`` naming a
    hub kernel ``org/name``); what remains are plain model-config fields such as ``hidden_dropout_prob``."""
    if not isinstance(overrides, dict):
        raise ValueError(f"model.config in {where} must be a mapping of model-config fields, got "
                         f"{type(overrides).__name__}")
    for key, value in overrides.items():
        if key in CODE_KEYS and value not in (None, False) and not trust_remote_code:
            raise ValueError(f"model.config.{key} in {where} would run Python code shipped with the model folder; a "
                             "config file cannot turn that on. If you trust the model, remove the key and run "
                             "`deltatune train RUN.yaml --trust-remote-code` (Python: run_config(..., "
                             "trust_remote_code=True))")
        if key in LOADING_KEYS or (key == "attn_implementation" and isinstance(value, str) and "/" in value):
            raise ValueError(f"model.config.{key} in {where} is a loading option, not a model-config field: run "
                             "configs load local files only (safetensors, never the hub or pickled weights); remove "
                             "it" + ("; attn_implementation may name a local implementation such as 'sdpa' or "
                                     "'eager', not a hub kernel" if key == "attn_implementation" else ""))


def load_config(config: str | Path | dict, trust_remote_code: bool = False) -> RunConfig:
    """Read (YAML file or dict), validate and resolve relative paths. The model path is resolved at load time.
    ``trust_remote_code``: the caller allows ``model.config.trust_remote_code`` / ``code_revision`` (see
    :func:`check_model_config`)."""
    if isinstance(config, dict):
        raw, base = config, Path.cwd()
    else:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"run config {str(path)!r} does not exist")
        with open(path, encoding="utf-8") as f:
            raw, base = yaml.safe_load(f) or {}, path.resolve().parent  # parse errors name the file
    if not isinstance(raw, dict):
        raise ValueError("a run config must be a mapping with sections model, data, method, train, output_dir")
    allowed = ["model", "data", "method", "train", "output_dir", "name"]
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ValueError(f"unknown top-level key(s) {unknown} in the run config; allowed: {allowed}")
    missing = [k for k in ("model", "data", "output_dir") if raw.get(k) is None]
    if missing:
        raise ValueError(f"the run config needs {missing}")

    model = _section(ModelConfig, raw["model"], "model")
    check_model_config(model.config, trust_remote_code, "a config dict" if isinstance(config, dict) else str(config))
    if trust_remote_code:
        model.config = {**model.config, "trust_remote_code": True}
    if model.task not in TASKS:
        raise ValueError(f"model.task must be one of {TASKS}, got {model.task!r}")
    if model.dtype is not None and model.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {model.dtype!r}")
    if model.path not in ("minilm", "smollm2"):
        model.path = resolve_path(model.path, base)

    data = _section(DataConfig, raw["data"], "data")
    data.train, data.eval = _resolve_source(data.train, base, "data.train"), _resolve_source(data.eval, base, "data.eval")
    if data.columns is not None:
        data.columns = check_column_names(data.columns)
    if model.task == "classification" and data.text is None:
        raise ValueError("data.text (the text column) is required for task 'classification'")
    if model.task == "causal_lm":
        if data.response is None:
            raise ValueError("data.response (the response column) is required for task 'causal_lm'")
        if (data.prompt is None) == (data.template is None):
            raise ValueError("task 'causal_lm' needs exactly one of data.prompt (a column) or data.template")
    for section, obj, keys in (("model", model, ("num_labels",)),
                               ("data", data, ("max_length", "max_train_rows", "max_eval_rows"))):
        for key in keys:
            if getattr(obj, key) is not None and getattr(obj, key) < 1:
                raise ValueError(f"{section}.{key} must be a positive integer (or left out), got {getattr(obj, key)}")
    data.max_length = data.max_length or DEFAULT_MAX_LENGTH[model.task]

    if not isinstance(raw["output_dir"], str) or not raw["output_dir"].strip():
        raise ValueError(f"output_dir must be a folder path, got {raw['output_dir']!r}")
    output_dir = Path(resolve_path(raw["output_dir"], base))
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {output_dir} is an existing file; give a folder (it is created if missing)")
    return RunConfig(model=model, data=data, method=parse_method(raw.get("method")),
                     train=TrainArgs.from_dict(raw.get("train") or {}), output_dir=output_dir,
                     name=raw.get("name", "default"))


# -- building the pieces ----------------------------------------------------------------------------------------
def head_modules(model: nn.Module) -> list[str]:
    """Linear layers of the classification head (``classifier`` or ``score``), which train in full."""
    for head in HEADS:
        module = getattr(model, head, None)
        if isinstance(module, nn.Module) and is_linear(module):
            return [head]
        if isinstance(module, nn.Module):
            return [f"{head}.{n}" for n, m in module.named_modules() if is_linear(m)]
    raise ValueError(f"found no classification head named {HEADS} on {type(model).__name__}; "
                     "list the head in method.modules_to_save")


def with_head(method: Method, model: nn.Module) -> Method:
    """``method`` with the classification head added to ``modules_to_save`` unless the user listed it."""
    listed = list(method.modules_to_save or [])
    extra = [h for h in head_modules(model) if not any(name_matches(h, k) for k in listed)]
    return dataclasses.replace(method, modules_to_save=listed + extra) if extra else method


def load_data(cfg: RunConfig, tokenizer) -> tuple[list[dict], list[dict] | None, dict | None]:
    """``(train examples, eval examples or None, label2id or None)``."""
    d = cfg.data
    splits = [("data.train", d.train, d.max_train_rows), ("data.eval", d.eval, d.max_eval_rows)]
    rows = {src: _read(path, limit, d.columns) if path is not None else None for src, path, limit in splits}
    train_src, eval_src = describe_source(d.train), describe_source(d.eval)
    if cfg.model.task == "classification":
        train_ex, label2id = encode_classification(rows["data.train"], tokenizer, d.text, d.label, d.text_pair,
                                                   d.max_length, source=train_src)
        eval_ex = None
        if rows["data.eval"] is not None:
            eval_ex, _ = encode_classification(rows["data.eval"], tokenizer, d.text, d.label, d.text_pair,
                                               d.max_length, label2id=label2id, source=eval_src)
        return train_ex, eval_ex, label2id
    encode = {"tokenizer": tokenizer, "response": d.response, "prompt": d.prompt, "template": d.template,
              "max_length": d.max_length}
    train_ex = encode_instructions(rows["data.train"], source=train_src, **encode)
    eval_ex = encode_instructions(rows["data.eval"], source=eval_src, **encode) if rows["data.eval"] else None
    return train_ex, eval_ex, None


def _read(source, limit: int | None, columns: list | None) -> list[dict]:
    """Rows of one data source; ``data.columns`` applies to the .csv/.tsv files among them."""
    headerless = isinstance(source, str) and source.lower().endswith((".csv", ".tsv"))
    return read_rows(source, limit, columns if headerless else None)


def load_model(cfg: ModelConfig, path: str, label2id: dict | None, pad_id: int) -> nn.Module:
    """The transformers model for the task, from a local folder only."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # optional (deltatune[hf])

    kwargs = {"local_files_only": True, **cfg.config}
    if cfg.dtype:
        kwargs["dtype"] = DTYPES[cfg.dtype]
    if cfg.task == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        model.config.use_cache = False
        return model
    n = cfg.num_labels or max(label2id.values()) + 1
    if n <= max(label2id.values()):
        raise ValueError(f"model.num_labels={n} is too small for the labels {sorted(label2id)}")
    names = {i: k for k, i in label2id.items()}
    id2label = {i: names.get(i, f"LABEL_{i}") for i in range(n)}
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=n, id2label=id2label, label2id={v: k for k, v in id2label.items()}, **kwargs)
    if model.config.pad_token_id is None:  # decoder classifiers find the last token through the pad id
        model.config.pad_token_id = pad_id
    return model


def _init_distributed() -> bool:
    """Initialize the default process group under torchrun if nobody has; True if this call did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def run_device() -> torch.device:
    """This process's device: its GPU (``LOCAL_RANK`` under torchrun) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# -- running ---------------------------------------------------------------------------------------------------------
CALIBRATION_BATCHES = 8


class CalibrationBatches:
    """The first ``n`` training batches of 8 examples, collated lazily (only data-aware selection reads them)."""

    def __init__(self, examples, collate, device: torch.device, n: int = CALIBRATION_BATCHES, size: int = 8):
        self.examples, self.collate, self.device, self.n, self.size = examples, collate, device, n, size

    def __len__(self) -> int:
        return min(self.n, -(-len(self.examples) // self.size))

    def __iter__(self):
        for i in range(len(self)):
            batch = self.collate(self.examples[i * self.size:(i + 1) * self.size])
            yield {k: v.to(self.device) for k, v in batch.items()}


def run_config(config: str | Path | dict, trust_remote_code: bool = False, resume_from: str | Path | None = None) -> dict:
    """Load model and data, attach the method, train, save the adapter to ``output_dir/adapter``.

    ``trust_remote_code=True`` lets the model folder's own Python code run (transformers' ``trust_remote_code``);
    a config file alone cannot ask for it. ``resume_from``: a ``checkpoint-<step>`` folder written with
    ``train.save_every``, or ``"last"`` for the newest one in ``output_dir``: training continues from there
    (adapters with their controller state, optimizer, scheduler, random state, data order).

    Writes to ``output_dir`` (rank 0): ``adapter/``, ``metrics.jsonl``, ``metrics.png``, ``config.yaml`` (the
    resolved config) and ``results.json``. Returns the :func:`~deltatune.train.trainer.train` result plus
    ``label2id``, ``output_dir`` and ``trainable_parameters``.
    """
    from transformers import AutoTokenizer  # optional dependency (deltatune[hf])

    cfg = load_config(config, trust_remote_code=trust_remote_code)
    created_group = _init_distributed()
    try:
        path = model_path(cfg.model.path, Path.cwd())
        code = {"trust_remote_code": True} if cfg.model.config.get("trust_remote_code") else {}
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **code)
        train_ex, eval_ex, label2id = load_data(cfg, tokenizer)
        pad_id = pad_id_of(tokenizer)

        set_seed(cfg.train.seed)  # a fresh classification head and the adapter init draw random numbers
        model = load_model(cfg.model, path, label2id, pad_id).to(run_device())
        method = with_head(cfg.method, model) if cfg.model.task == "classification" else cfg.method
        M.attach(model, method, name=cfg.name, data=CalibrationBatches(train_ex, Collator(pad_id), run_device()))

        result = train(model, train_ex, cfg.train, task=cfg.model.task, eval_data=eval_ex,
                       collate_fn=Collator(pad_id), output_dir=cfg.output_dir,
                       resume_from=last_checkpoint(cfg.output_dir) if resume_from == "last" else resume_from)
        trainable, total = M.trainable_parameters(model)
        result.update(label2id=label2id, output_dir=str(cfg.output_dir),
                      trainable_parameters={"trainable": trainable, "total": total})
        if result["metrics_path"] is not None:  # rank 0
            data = {k: describe_source(v) if is_dataset(v) else v for k, v in vars(cfg.data).items()}
            resolved = {"model": {**dataclasses.asdict(cfg.model), "path": path}, "data": data,
                        "method": {"name": method.name, **dataclasses.asdict(method)},
                        "train": dataclasses.asdict(cfg.train), "output_dir": str(cfg.output_dir), "name": cfg.name}
            resolved = json.loads(json.dumps(resolved, default=str))  # plain YAML types only
            write_text(cfg.output_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
            summary = {k: v for k, v in result.items() if k != "history"}
            write_text(cfg.output_dir / "results.json", json.dumps(summary, indent=2) + "\n")
        return result
    finally:
        if created_group:
            dist.destroy_process_group()


__all__ = ["CODE_KEYS", "LOADING_KEYS", "DataConfig", "ModelConfig", "RunConfig", "check_model_config", "head_modules",
           "last_checkpoint", "load_config", "load_data", "load_model", "model_path", "parse_method", "run_config",
           "with_head"]
