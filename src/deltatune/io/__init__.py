"""Checkpoints: deltatune's own format, the PEFT LoRA format, and the LoRA files of diffusion models (diffusers'
``pytorch_lora_weights.safetensors``: :mod:`.diffusers_format`; kohya / A1111: :mod:`.kohya_format`).

Own format, one folder per adapter:

- ``adapter_config.json``: ``{"format": "deltatune", "format_version", "name", "method": {...},
  "base_model_name_or_path", "task_type", "modules": {module name: {"layer", "structure", "out_features",
  "in_features", ...structure fields}}}``
- ``adapter_model.safetensors``: ``"<module name>.<tensor name>"`` for every delta tensor.
- training state (``dt.save(..., controller_state=True)``, the default): ``"controller": {"step", "state"}`` in the
  config, the state's tensors in the safetensors file as ``"@controller/<path>"`` (see :mod:`.state`).

Several adapters saved together go to one subfolder each, named after the adapter. The diffusion formats are one
file, ``pytorch_lora_weights.safetensors`` in the folder (what ``pipe.load_lora_weights(folder)`` finds); ``load``
also reads such a file given by its own path (a downloaded kohya ``.safetensors``).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .._version import __version__
from .. import control as C
from .. import model as M
from ..layers import kind_of, unwrap
from ..registry import adapted_layers, check_names, registry, sync
from ..checks import export_rank_energy
from ..sharding import barrier_if_distributed, full, gathered, owned, refuse_sharded, sharded_parameters, writer
from ..methods import Method
from ..files import (CONFIG_NAME, WEIGHTS_NAME, adapter_folders, check_output_folder, read_adapter,
                    write_adapter_files, write_generation, write_tensors)
from .peft_format import NeedsBase, NotLowRank, from_peft, to_peft
from .diffusers_format import DEFAULT_COMPONENT, NAME_KEY, WEIGHT_NAME as LORA_FILE, from_diffusers, to_diffusers
from .kohya_format import from_kohya, is_kohya, to_kohya
from .state import CONTROLLER_PREFIX, join_state, split_state
from .record import FORMAT_VERSION, PLAIN_FORMAT_VERSION, AdapterRecord, build_deltas, check_fits, check_record, record_from_model

FORMATS = ("deltatune", "peft", "diffusers", "kohya")
#: the formats written as one safetensors file with metadata (``LORA_FILE``), by their writers
LORA_FILE_FORMATS = {"diffusers": to_diffusers, "kohya": to_kohya}


def to_own(record: AdapterRecord) -> tuple[dict, dict[str, torch.Tensor]]:
    config = {
        "format": "deltatune", "deltatune_version": __version__,
        "format_version": PLAIN_FORMAT_VERSION if record.controller is None else FORMAT_VERSION,
        "name": record.name, "method": record.method, "base_model_name_or_path": record.base_model,
        "task_type": record.task_type, "modules": record.modules, **record.extra,
    }
    tensors = {f"{mod}.{k}": v for mod, ts in record.tensors.items() for k, v in ts.items()}
    if record.controller is not None:
        config["controller"], state_tensors = split_state(record.controller, CONTROLLER_PREFIX)
        tensors.update(state_tensors)
    return config, tensors


def from_own(config: dict, tensors: dict[str, torch.Tensor], name: str | None = None) -> AdapterRecord:
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"checkpoint format version {config['format_version']} is newer than this deltatune reads "
                         f"({FORMAT_VERSION}); upgrade deltatune")
    per_module: dict[str, dict[str, torch.Tensor]] = {m: {} for m in config["modules"]}
    state = {k: t for k, t in tensors.items() if k.startswith(CONTROLLER_PREFIX)}
    controller = join_state(config["controller"], state) if config.get("controller") is not None else None
    for key, t in tensors.items():
        if key in state:
            continue
        mod, _, tname = key.rpartition(".")
        if mod not in per_module:
            raise ValueError(f"checkpoint tensor {key!r} belongs to no module listed in its config")
        per_module[mod][tname] = t
    return AdapterRecord(name or config["name"], config["method"], config["modules"], per_module,
                         base_model=config.get("base_model_name_or_path"), task_type=config.get("task_type"),
                         controller=controller)


def read_record(folder: str | Path, name: str | None = None, model: nn.Module | None = None) -> AdapterRecord:
    """Read one adapter folder of either format. PEFT checkpoints need the ``model`` to know layer kinds.

    A malformed config (a missing key, a value of the wrong JSON type, a bad method field or module spec:
    :func:`check_record`) raises ``ValueError`` naming the file and what is wrong, never a bare ``KeyError``."""
    config, tensors = read_adapter(folder)
    where = Path(folder) / CONFIG_NAME
    if not isinstance(config, dict):
        raise ValueError(f"{where} must hold a JSON object, not a JSON {type(config).__name__}")
    try:
        record = _parse(folder, config, tensors, name, model)
        check_record(record)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        if isinstance(e, KeyError):
            why = f"missing key {e.args[0]!r} (the file is incomplete or not written by deltatune / PEFT)"
        elif isinstance(e, AttributeError):
            why = f"a value has the wrong JSON type ({e})"
        else:
            why = str(e)
        raise ValueError(why if why.startswith(str(folder)) else f"{where}: {why}") from None
    return record


def model_kinds(model: nn.Module | None) -> dict[str, str]:
    """``{module name: layer kind}`` of the model's adaptable modules (``{}`` without a model)."""
    kinds = {}
    for mod, base in (M.base_modules(model) if model is not None else ()):
        try:
            kinds[mod] = kind_of(base).name
        except TypeError:
            pass
    return kinds


def lora_files(path: str | Path) -> dict[str, Path] | None:
    """``{name: file}`` of the diffusion LoRA files (diffusers, kohya) at ``path``: a ``.safetensors`` file itself,
    a folder's ``pytorch_lora_weights.safetensors`` or one per subfolder (a multi-adapter save); ``None`` when
    ``path`` holds adapter folders instead."""
    path = Path(path)
    if path.is_file():
        return {"": path} if path.suffix == ".safetensors" else None
    if not path.is_dir() or (path / CONFIG_NAME).is_file():
        return None
    if (path / LORA_FILE).is_file():
        return {"": path / LORA_FILE}
    subs = [p for p in sorted(path.iterdir()) if not p.name.startswith(".") and p.is_dir()]
    if any((p / CONFIG_NAME).is_file() for p in subs):
        return None
    return {p.name: p / LORA_FILE for p in subs if (p / LORA_FILE).is_file()} or None


def read_lora_file(file: str | Path, name: str | None, model: nn.Module, component: str | None = None
                   ) -> AdapterRecord:
    """The adapter in a diffusers or kohya LoRA file, for ``model`` (kohya names need its module names; a file
    with component-prefixed keys needs its top-level children); of a file for several pipeline components, the
    keys of ``component`` (default: ``"unet"``, or the only one), the others skipped with a warning. ``name``:
    the adapter's name; ``None``: the one the file's metadata records (``deltatune_adapter_name``), or
    ``"default"``. Every module is checked to fit the model before
    anything is built; the first that does not raises ``ValueError`` naming the file and the module's key."""
    source = str(file)
    try:
        with safe_open(source, framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{source} is not a readable safetensors file ({e})") from None
    if not tensors:
        raise ValueError(f"{source} holds no tensors: not a LoRA file")
    kinds = model_kinds(model)
    name = name or (metadata or {}).get(NAME_KEY) or "default"
    try:
        if is_kohya(tensors):
            record, keys = from_kohya(tensors, name, kinds, source, component)
        else:
            children = {n for n, _ in unwrap(model).named_children()}
            record = from_diffusers(tensors, metadata, name, kinds, children, source, component)
            keys = {m: m for m in record.modules}
        check_record(record)
    except KeyError as e:
        raise ValueError(f"{source}: missing key {e.args[0]!r} (the file is incomplete)") from None
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None
    for mod, spec in record.modules.items():
        try:
            check_fits(model, AdapterRecord(record.name, record.method, {mod: spec}, {}, record.base_model))
        except ValueError as e:
            raise ValueError(f"{source}: key {keys[mod]!r}: {e}") from None
    return record


def _parse(folder, config: dict, tensors: dict, name: str | None, model: nn.Module | None) -> AdapterRecord:
    if config.get("format") == "deltatune":
        return from_own(config, tensors, name)
    if "peft_type" in config:  # from_peft checks PEFT's scalars (check_peft_values)
        return from_peft(config, tensors, name or "default", model_kinds(model), source=str(Path(folder) / CONFIG_NAME))
    raise ValueError(f"{Path(folder) / CONFIG_NAME} is neither a deltatune nor a PEFT adapter config")


def _convert(record: AdapterRecord, format: str, rank: int | None, errors: dict | None, energy: float | None = None,
             base=None, component: str | None = DEFAULT_COMPONENT):
    """What :func:`write_files` writes: ``(config, tensors)`` of an adapter folder (deltatune, PEFT) or
    ``(None, (tensors, metadata))`` of a LoRA file (diffusers, kohya; ``component``: the pipeline's name for the
    model, which prefixes the keys)."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {FORMATS}")
    export_rank_energy(rank, energy)
    if format in LORA_FILE_FORMATS:
        return None, LORA_FILE_FORMATS[format](record, component, rank, errors, energy, base)
    return to_peft(record, rank, errors, energy, base) if format == "peft" else to_own(record)


def write_files(folder: Path, converted) -> None:
    """The files of one converted adapter (:func:`_convert`) into a folder of a generation being filled."""
    config, tensors = converted
    if config is None:
        folder.mkdir(parents=True, exist_ok=True)
        write_tensors(folder / LORA_FILE, *tensors)
    else:
        write_adapter_files(folder, config, tensors)


def write_record(folder: str | Path, record: AdapterRecord, format: str = "deltatune", rank: int | None = None,
                 energy: float | None = None, base=None, component: str | None = DEFAULT_COMPONENT
                 ) -> dict[str, float]:
    """Write one adapter; returns ``{module: relative error}`` of the modules factored by truncated SVD (PEFT format
    with ``rank`` or ``energy``). ``base(module, spec) -> (weight, bias)``: see :func:`to_peft`."""
    errors: dict[str, float] = {}
    converted = _convert(record, format, rank, errors, energy, base, component)
    write_generation(folder, lambda staging: write_files(staging, converted))
    return errors


def model_base(model: nn.Module):
    """``base(module, spec) -> (weight, bias)`` read from ``model``'s adapted layers; refuses a layer with merged
    adapters (its weight is no longer the base weight the update is relative to)."""
    layers = dict(adapted_layers(unwrap(model)))

    def base(mod: str, spec: dict):
        layer = layers[mod]
        if layer.merged:
            raise ValueError(f"{mod}: adapters {list(layer.merged)} are merged into its weight, and a "
                             f"{spec['structure']!r} update is relative to the base weight; dt.unmerge(model) first")
        return full(layer.linear_weight().detach()), full(layer.base_bias())
    return base


def save(model: nn.Module, path: str | Path, names: str | list[str] | None = None, format: str = "deltatune",
         rank: int | None = None, energy: float | None = None, controller_state: bool = True,
         component: str | None = DEFAULT_COMPONENT) -> Path:
    """Save adapters (default: all). One adapter goes to ``path`` itself; several to ``path/<name>/``.

    ``format="peft"`` writes PEFT's LoRA checkpoint (loads with ``PeftModel.from_pretrained``, servable by vLLM);
    structures that are not a LoRA (sparse, sliced, rotations, dense combinations) need ``rank`` (or ``energy``, the
    share of ``||dW||_F^2`` to keep per module): they are factored by truncated SVD and the relative error of each
    module is reported as a warning.

    ``format="diffusers"`` writes the LoRA file diffusers reads (``pipe.load_lora_weights(path)``,
    ``unet.load_lora_adapter(path, prefix="unet")``; keys ``<component>.<module>.lora_A.weight``, the config in the
    file's metadata; ``component=None``: a model's own keys, ``unet.load_lora_adapter(path, prefix=None)``);
    ``format="kohya"`` the kohya / A1111 file (``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight``,
    ``.alpha``). Both are ``path/pytorch_lora_weights.safetensors``; conv LoRA in PEFT's kernel-shaped layout.

    The save is atomic as a whole: all adapters are written into a hidden staging folder next to ``path`` and
    swapped in at once (see :mod:`deltatune.files`), so a crash at any point leaves either the previous content
    of ``path`` or the new one, and other files already in ``path`` are kept. ``controller_state`` (deltatune format): the step
    counter and each adapter's controller state (EMAs, masks, schedule) go into the same files, so that ``dt.load``
    resumes training where it stopped.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {FORMATS}")
    path = check_output_folder(path, "save folder")
    check_not_input(path, [_model_folder(model)], "the base model's folder", inside_ok=True)
    names = check_names(model, M.adapters(model) if names is None else names)
    if not names:
        raise ValueError("the model has no adapters to save")
    if len(set(names)) != len(names):
        raise ValueError(f"names {names} list an adapter twice")
    if len(names) > 1:
        for n in names:  # each becomes a folder name
            if len(n.encode()) > 255:
                raise ValueError(f"adapter name {n[:40]!r}... is {len(n.encode())} bytes long; a multi-adapter save "
                                 "writes one folder per adapter and folder names are limited to 255 bytes: rename it")
    sharded = bool(sharded_parameters(model))
    with gathered(model):  # FSDP2: all ranks gather the full tensors (every rank calls dt.save)
        records = [record_from_model(model, n, controller_state and format == "deltatune") for n in names]
        base = model_base(model)
        # convert all before writing any (a non-LoRA delta fails here, not half-way)
        converted = []
        for rec in records:
            errors: dict[str, float] = {}
            files = _convert(rec, format, rank, errors, energy, base, component)
            converted.append((rec, errors, owned(files) if sharded else files))

    def fill(staging: Path) -> None:
        for rec, _, files in converted:
            write_files(staging if len(records) == 1 else staging / rec.name, files)

    # FSDP2: every rank gathered the shards above (a collective: all ranks call dt.save), rank 0 writes, the others
    # wait for it; an unsharded model (one process, or DDP where rank 0 alone may call dt.save) just writes
    if not sharded or writer():
        write_generation(path, fill)
    if sharded:
        barrier_if_distributed()
    if format != "deltatune":
        warn_file_caveats(model, records, format)
    for rec, errors, _ in converted:
        if errors:
            warnings.warn(f"adapter {rec.name!r}: {svd_error_summary(errors)}", stacklevel=2)
    return path


def warn_file_caveats(model: nn.Module, records: list[AdapterRecord], format: str) -> None:
    """One warning naming the exported modules whose layer kind says other readers run them otherwise
    (:attr:`~deltatune.layers.LayerKind.file_caveat`)."""
    bases = dict(M.base_modules(model))
    caveats = {mod: why for rec in records for mod in rec.modules if mod in bases
               and (why := kind_of(bases[mod]).file_caveat(bases[mod])) is not None}
    if caveats:
        warnings.warn(f"{format} export: PEFT and diffusers (and kohya readers) run the LoRA of "
                      f"{len(caveats)} modules otherwise than deltatune, their lora_A lacking the layer's setting "
                      f"({'; '.join(f'{m}: {w}' for m, w in sorted(caveats.items()))}): unmerged, their outputs "
                      "differ (merged into the weight they are right); deltatune reads the file back exactly",
                      stacklevel=3)


def _model_folder(model: nn.Module) -> str | None:
    name = getattr(getattr(unwrap(model), "config", None), "_name_or_path", None)
    return name if name and Path(name).is_dir() else None


def check_not_input(output: str | Path, inputs, what: str = "an input", inside_ok: bool = False) -> None:
    """Refuse an ``output`` folder that is one of the ``inputs`` (files or folders; ``None`` skipped), contains
    one, or (unless ``inside_ok``) lies inside one: writing it would replace or move what is being read."""
    out = Path(os.path.realpath(output))
    for inp in inputs:
        if inp is None or not os.path.exists(inp):
            continue
        src = Path(os.path.realpath(inp))
        if out == src or out in src.parents or (src in out.parents and not inside_ok):
            relation = "is" if out == src else "is inside" if src in out.parents else "contains"
            raise ValueError(f"output {output} {relation} {what} {inp}; writing it would overwrite its own input: "
                             "choose another output folder")


def svd_error_summary(errors: dict[str, float]) -> str:
    """One line on the truncated-SVD export error: mean, and the worst module."""
    worst = max(errors, key=errors.get)
    mean = sum(errors.values()) / len(errors)
    return (f"{len(errors)} modules factored by truncated SVD; relative error mean {mean:.3f}, worst "
            f"{errors[worst]:.3f} ({worst})")


def load(model: nn.Module, path: str | Path, name: str | None = None, activate: bool = True,
         is_trainable: bool = True, controller_state: bool = True, component: str | None = None) -> nn.Module:
    """Load adapter(s) saved by :func:`save` (any format) or by PEFT onto ``model``; ``path`` may also be a
    diffusers or kohya LoRA ``.safetensors`` file (``model.save_lora_adapter``, ``save_lora_weights``, A1111), or
    the ``adapter_model.safetensors`` of an adapter folder (loads the folder).

    ``name`` renames a single adapter. Every module is checked to fit (name, kind, shape) before the model
    is touched; the first mismatch raises ``ValueError``. The base model's parameters are frozen. With
    ``activate=True`` the loaded adapter becomes the active one and, by default (``is_trainable=True``), trains
    like a freshly attached one (resume training). ``is_trainable=False`` loads it frozen, as PEFT's
    ``PeftModel.from_pretrained`` does by default: no ``requires_grad``, no controller steps, until a later
    ``dt.set_active`` says otherwise.
    ``controller_state``: restore the saved controller state and step counter (a resumed run's ``dt.begin``
    continues from that step); ``False`` starts them afresh.
    ``component`` (diffusers / kohya files of a whole pipeline, e.g. ``lora_unet_*`` with ``lora_te_*`` keys): the
    pipeline component ``model`` is (``"unet"``, ``"text_encoder"``, ...); default ``"unet"`` when the file has it,
    or the file's only component. The other components' keys are skipped with one warning.
    """
    if Path(path).name == WEIGHTS_NAME and (Path(path).parent / CONFIG_NAME).is_file():
        path = Path(path).parent  # an adapter folder's weights file: its config is part of the adapter
    files = lora_files(path)
    folders = adapter_folders(path) if files is None else files
    if name is not None and len(folders) > 1:
        raise ValueError(f"{path} holds {len(folders)} adapters ({', '.join(folders)}); name= renames one only")
    if files is None:
        records = [read_record(f, name or sub or None, model) for sub, f in folders.items()]
    else:
        records = [read_lora_file(f, name or sub or None, model, component) for sub, f in files.items()]
    built = []
    refuse_sharded(model, f"load {path}", M.ATTACH_BEFORE_SHARDING)
    for rec, folder in zip(records, folders.values()):
        try:
            M.check_install(model, rec.name, activate)
            built.append(build_deltas(model, rec))
        except ValueError as e:
            raise ValueError(f"{folder}: {e}") from None
    for rec, deltas in zip(records, built):
        M.install(model, rec.name, Method.from_dict(rec.method), deltas, activate=activate)
    if controller_state and is_trainable:  # a frozen adapter's controller does not run: its state and step stay out
        restore_controllers(model, records)
    if not is_trainable:
        reg = registry(model)
        reg.trainable = [n for n in reg.training() if n not in {rec.name for rec in records}]
        sync(model)
    return model


def restore_controllers(model: nn.Module, records: list[AdapterRecord]) -> None:
    """Restore each record's saved controller state and the step counter (:func:`deltatune.control.load_state`);
    on error the freshly loaded adapters are removed again (a failed load changes nothing)."""
    try:
        C.load_state(model, {rec.name: rec.controller for rec in records})
    except BaseException:
        for rec in records:
            M.delete(model, rec.name)
        raise


__all__ = ["AdapterRecord", "FORMATS", "lora_files", "read_lora_file", "write_files", "CONFIG_NAME", "check_not_input", "NeedsBase", "NotLowRank", "WEIGHTS_NAME", "check_fits", "from_own", "from_peft",
           "load", "model_base", "read_record", "record_from_model", "save", "svd_error_summary", "to_own", "to_peft", "write_record"]
