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
  ``{hidden_dropout_prob: 0.0}``).
- ``data``: ``train``, ``eval``, ``max_length``, ``max_train_rows``, ``max_eval_rows``; for classification ``text``,
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
import yaml
from torch import nn

from .. import model as M
from ..io.files import write_text
from ..methods.base import Method, check_fields
from ..targets import name_matches
from .data import TASKS, Collator, encode_classification, encode_instructions, pad_id_of, read_rows
from .fields import typed_fields
from .trainer import TrainArgs, set_seed, train

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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
    train: str
    eval: str | None = None
    text: str | None = None
    text_pair: str | None = None
    label: str = "label"
    prompt: str | None = None
    response: str | None = None
    template: str | None = None
    max_length: int | None = None
    max_train_rows: int | None = None
    max_eval_rows: int | None = None


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


def _resolve(path: str | None, base: Path) -> str | None:
    if path is None:
        return None
    p = Path(os.path.expanduser(str(path)))
    return str(p if p.is_absolute() else base / p)


def model_path(path: str, base: Path) -> str:
    """A local model folder; ``minilm`` and ``smollm2`` name the packaged models of :mod:`deltatune.zoo`."""
    from .. import zoo

    named = {"minilm": zoo.minilm_path, "smollm2": zoo.smollm2_path}
    if str(path) in named:
        return str(named[str(path)]())
    folder = Path(_resolve(path, base))
    if not folder.is_dir():
        raise FileNotFoundError(f"model.path {str(folder)!r} is not a folder; give a local model folder or one of "
                                f"{sorted(named)} (models are never downloaded)")
    return str(folder)


def load_config(config: str | Path | dict) -> RunConfig:
    """Read (YAML file or dict), validate and resolve relative paths. The model path is resolved at load time."""
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
    if model.task not in TASKS:
        raise ValueError(f"model.task must be one of {TASKS}, got {model.task!r}")
    if model.dtype is not None and model.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {model.dtype!r}")
    if model.path not in ("minilm", "smollm2"):
        model.path = _resolve(model.path, base)

    data = _section(DataConfig, raw["data"], "data")
    data.train, data.eval = _resolve(data.train, base), _resolve(data.eval, base)
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
    output_dir = Path(_resolve(raw["output_dir"], base))
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
        if isinstance(module, nn.Linear):
            return [head]
        if isinstance(module, nn.Module):
            return [f"{head}.{n}" for n, m in module.named_modules() if isinstance(m, nn.Linear)]
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
    rows = {src: read_rows(path, limit) if path else None for src, path, limit in splits}
    if cfg.model.task == "classification":
        train_ex, label2id = encode_classification(rows["data.train"], tokenizer, d.text, d.label, d.text_pair,
                                                   d.max_length, source=d.train)
        eval_ex = None
        if rows["data.eval"] is not None:
            eval_ex, _ = encode_classification(rows["data.eval"], tokenizer, d.text, d.label, d.text_pair,
                                               d.max_length, label2id=label2id, source=d.eval)
        return train_ex, eval_ex, label2id
    encode = {"tokenizer": tokenizer, "response": d.response, "prompt": d.prompt, "template": d.template,
              "max_length": d.max_length}
    train_ex = encode_instructions(rows["data.train"], source=d.train, **encode)
    eval_ex = encode_instructions(rows["data.eval"], source=d.eval, **encode) if rows["data.eval"] else None
    return train_ex, eval_ex, None


def load_model(cfg: ModelConfig, path: str, label2id: dict | None, pad_id: int) -> nn.Module:
    """The transformers model for the task, from a local folder only."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

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
    import torch.distributed as dist

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


def run_config(config: str | Path | dict) -> dict:
    """Load model and data, attach the method, train, save the adapter to ``output_dir/adapter``.

    Writes to ``output_dir`` (rank 0): ``adapter/``, ``metrics.jsonl``, ``metrics.png``, ``config.yaml`` (the
    resolved config) and ``results.json``. Returns the :func:`~deltatune.train.trainer.train` result plus
    ``label2id``, ``output_dir`` and ``trainable_parameters``.
    """
    from transformers import AutoTokenizer

    cfg = load_config(config)
    created_group = _init_distributed()
    try:
        path = model_path(cfg.model.path, Path.cwd())
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        train_ex, eval_ex, label2id = load_data(cfg, tokenizer)
        pad_id = pad_id_of(tokenizer)

        set_seed(cfg.train.seed)  # a fresh classification head and the adapter init draw random numbers
        model = load_model(cfg.model, path, label2id, pad_id).to(run_device())
        method = with_head(cfg.method, model) if cfg.model.task == "classification" else cfg.method
        M.attach(model, method, name=cfg.name, data=CalibrationBatches(train_ex, Collator(pad_id), run_device()))

        result = train(model, train_ex, cfg.train, task=cfg.model.task, eval_data=eval_ex,
                       collate_fn=Collator(pad_id), output_dir=cfg.output_dir)
        trainable, total = M.trainable_parameters(model)
        result.update(label2id=label2id, output_dir=str(cfg.output_dir),
                      trainable_parameters={"trainable": trainable, "total": total})
        if result["metrics_path"] is not None:  # rank 0
            resolved = {"model": {**dataclasses.asdict(cfg.model), "path": path}, "data": dataclasses.asdict(cfg.data),
                        "method": {"name": method.name, **dataclasses.asdict(method)},
                        "train": dataclasses.asdict(cfg.train), "output_dir": str(cfg.output_dir), "name": cfg.name}
            resolved = json.loads(json.dumps(resolved, default=str))  # plain YAML types only
            write_text(cfg.output_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
            summary = {k: v for k, v in result.items() if k != "history"}
            write_text(cfg.output_dir / "results.json", json.dumps(summary, indent=2) + "\n")
        return result
    finally:
        if created_group:
            import torch.distributed as dist
            dist.destroy_process_group()


__all__ = ["DataConfig", "ModelConfig", "RunConfig", "head_modules", "load_config", "load_data", "load_model",
           "model_path", "parse_method", "run_config", "with_head"]
