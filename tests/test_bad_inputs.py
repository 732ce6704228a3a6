"""A catalogue of bad inputs (issue 15, B4 B5 B7 B9 B10): malformed configs of both formats, wrong types, damaged
files, wrong shapes, NaN tensors, bad method arguments and bad verb calls. Each must raise a clear error that names
the file or argument, and leave the model exactly as it was (every tensor of its ``state_dict`` compared)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import logits, make_minilm, randomize
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.files import CONFIG_NAME, WEIGHTS_NAME

Q0 = "bert.encoder.layer.0.attention.self.query"


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    changed = [k for k, v in after.items() if not torch.equal(v, before[k])]
    assert not changed, f"changed by a refused call: {changed[:5]}"


# -- checkpoints: one good adapter of each format, corrupted one way per case -------------------------------------
@pytest.fixture(scope="module")
def good(minilm_dir, tmp_path_factory):
    """``{"own": folder, "peft": folder}`` of one trained LoRA (query/value) plus the classifier head."""
    model = make_minilm(minilm_dir, seed=0)
    dt.attach(model, dt.LoRA(r=2, alpha=4, targets=["query", "value"], modules_to_save=["classifier"]), name="good")
    randomize(model, "good")
    root = tmp_path_factory.mktemp("good")
    return {"own": dt.save(model, root / "own"), "peft": dt.save(model, root / "peft", format="peft")}


@pytest.fixture(scope="module")
def plain(minilm_dir):
    model = make_minilm(minilm_dir, seed=0)
    return model, snapshot(model)


def _edit(src: Path, dst: Path, config=None, tensors=None, raw_config: str | None = None,
          raw_weights: bytes | None = None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / CONFIG_NAME).read_text())
        cfg = config(cfg)
        (dst / CONFIG_NAME).write_text(json.dumps(cfg))
    if raw_config is not None:
        (dst / CONFIG_NAME).write_text(raw_config)
    if tensors is not None:
        ts = load_file(str(dst / WEIGHTS_NAME))
        tensors(ts)
        save_file(ts, str(dst / WEIGHTS_NAME))
    if raw_weights is not None:
        (dst / WEIGHTS_NAME).write_bytes(raw_weights)
    return dst


def _set(path: str, value):
    """A config edit: ``cfg[a][b]... = value`` for ``path = "a/b/..."`` (``value`` DELETE removes the key)."""
    keys = path.split("/")

    def edit(cfg):
        d = cfg
        for k in keys[:-1]:
            d = d[k]
        if value is DELETE:
            del d[keys[-1]]
        else:
            d[keys[-1]] = value
        return cfg
    return edit


DELETE = object()
NAN, INF = float("nan"), float("inf")


def _tensor(key: str, fn):
    def edit(ts):
        ts[key] = fn(ts[key])
    return edit


def _drop(key: str):
    return lambda ts: ts.pop(key)


# (format, case id, config edit, tensor edit, raw config, what the message must say besides the file)
CHECKPOINT_CASES = [
    ("own", "config-is-a-list", lambda c: [c], None, None, "JSON object"),
    ("own", "no-modules", _set("modules", DELETE), None, None, "'modules'"),
    ("own", "no-method", _set("method", DELETE), None, None, "'method'"),
    ("own", "no-name", _set("name", DELETE), None, None, "'name'"),
    ("own", "modules-a-list", _set("modules", ["x"]), None, None, "modules"),
    ("own", "spec-a-list", _set(f"modules/{Q0}", [1, 2]), None, None, Q0),
    ("own", "spec-no-r", _set(f"modules/{Q0}/r", DELETE), None, None, "'r'"),
    ("own", "spec-no-scale", _set(f"modules/{Q0}/scale", DELETE), None, None, "'scale'"),
    ("own", "spec-no-in_features", _set(f"modules/{Q0}/in_features", DELETE), None, None, "'in_features'"),
    ("own", "spec-no-structure", _set(f"modules/{Q0}/structure", DELETE), None, None, "'structure'"),
    ("own", "spec-unknown-structure", _set(f"modules/{Q0}/structure", "hyper"), None, None, "hyper"),
    ("own", "spec-scale-nan", _set(f"modules/{Q0}/scale", NAN), None, None, "'scale'"),
    ("own", "spec-scale-inf", _set(f"modules/{Q0}/scale", INF), None, None, "'scale'"),
    ("own", "spec-scale-string", _set(f"modules/{Q0}/scale", "2"), None, None, "'scale'"),
    ("own", "spec-r-float", _set(f"modules/{Q0}/r", 2.5), None, None, "'r'"),
    ("own", "spec-r-bool", _set(f"modules/{Q0}/r", True), None, None, "'r'"),
    ("own", "spec-r-wrong", _set(f"modules/{Q0}/r", 3), None, None, "r=3"),
    ("own", "spec-out-negative", _set(f"modules/{Q0}/out_features", -384), None, None, "'out_features'"),
    ("own", "method-r-string", _set("method/r", "8"), None, None, "'8'"),
    ("own", "method-r-bool", _set("method/r", True), None, None, "LoRA.r"),
    ("own", "method-alpha-nan", _set("method/alpha", NAN), None, None, "LoRA.alpha"),
    ("own", "method-alpha-zero", _set("method/alpha", 0), None, None, "LoRA.alpha"),
    ("own", "method-unknown", _set("method/method", "nope"), None, None, "nope"),
    ("own", "format-version-string", _set("format_version", "one"), None, None, "format"),
    ("own", "not-json", None, None, '{"format": "deltatune", "modules": {', "not valid JSON"),
    ("own", "tensor-nan", None, _tensor(f"{Q0}.A", lambda t: t.index_fill(1, torch.tensor([3]), NAN)), None,
     f"{Q0}"),
    ("own", "tensor-inf", None, _tensor("classifier.weight", lambda t: t.index_fill(0, torch.tensor([1]), INF)),
     None, "classifier"),
    ("own", "tensor-missing", None, _drop(f"{Q0}.A"), None, "'A'"),
    ("own", "tensor-extra", None, lambda ts: ts.update({f"{Q0}.C": torch.zeros(2)}), None, "'C'"),
    ("own", "tensor-wrong-shape", None, _tensor(f"{Q0}.B", lambda t: t[:-1]), None, Q0),
    ("own", "head-bias-wrong-shape", None, _tensor("classifier.bias", lambda t: torch.zeros(3)), None, "bias"),
    ("own", "tensor-2d-bias", None, _tensor("classifier.bias", lambda t: t[None]), None, "bias"),
    ("peft", "peft-config-list", lambda c: [c], None, None, "JSON object"),
    ("peft", "peft-no-lora_alpha", _set("lora_alpha", DELETE), None, None, "'lora_alpha'"),
    ("peft", "peft-no-r", _set("r", DELETE), None, None, "'r'"),
    ("peft", "peft-alpha-string", _set("lora_alpha", "4"), None, None, "lora_alpha"),
    ("peft", "peft-adalora-no-init_r", _set("peft_type", "ADALORA"), None, None, "'init_r'"),
    ("peft", "peft-nan", None, lambda ts: ts.update({k: v * NAN for k, v in ts.items() if "lora_B" in k}), None,
     "lora_B" if False else "NaN"),
    ("peft", "peft-head-bias-shape", None,
     lambda ts: ts.update({k: torch.zeros(5) for k in list(ts) if k.endswith("classifier.modules_to_save.bias")
                           or k.endswith("classifier.bias")}), None, "bias"),
]


@pytest.mark.parametrize("fmt,case,config,tensors,raw,says", CHECKPOINT_CASES, ids=[c[1] for c in CHECKPOINT_CASES])
def test_bad_checkpoint_is_refused_naming_the_file(good, plain, tmp_path, fmt, case, config, tensors, raw, says):
    model, before = plain
    bad = _edit(good[fmt], tmp_path / case, config=config, tensors=tensors, raw_config=raw)
    with pytest.raises(ValueError) as err:
        dt.load(model, bad)
    msg = str(err.value)
    assert str(bad) in msg and says in msg, msg
    assert dt.adapters(model) == []
    assert_unchanged(model, before)


@pytest.mark.parametrize("cut", [4, 100, -50], ids=["header-len", "header", "data"])
def test_truncated_safetensors_names_the_file(good, plain, tmp_path, cut):
    model, before = plain
    data = (good["own"] / WEIGHTS_NAME).read_bytes()
    bad = _edit(good["own"], tmp_path / "cut", raw_weights=data[:cut])
    with pytest.raises(ValueError, match="safetensors") as err:
        dt.load(model, bad)
    assert str(bad / WEIGHTS_NAME) in str(err.value)
    assert_unchanged(model, before)


def test_good_checkpoints_still_load(good, minilm_dir, minilm_batch):
    for fmt in ("own", "peft"):
        model = make_minilm(minilm_dir, seed=5)
        dt.load(model, good[fmt])
        assert torch.isfinite(logits(model, minilm_batch)).all()


# -- method arguments ----------------------------------------------------------------------------------------------
METHOD_CASES = [
    (dict(r="8"), TypeError, "LoRA.r must be int, got '8' (str)"),
    (dict(r=True), TypeError, "LoRA.r must be int, got True (bool)"),
    (dict(r=0), ValueError, "LoRA.r"),
    (dict(r=2.0), TypeError, "LoRA.r"),
    (dict(alpha=NAN), ValueError, "LoRA.alpha must be a finite number"),
    (dict(alpha=INF), ValueError, "LoRA.alpha must be a finite number"),
    (dict(alpha=0), ValueError, "LoRA.alpha must not be 0"),
    (dict(alpha="16"), TypeError, "LoRA.alpha"),
    (dict(dropout="0.1"), TypeError, "LoRA.dropout"),
    (dict(use_rslora="yes"), TypeError, "LoRA.use_rslora"),
    (dict(alpha_pattern={"query": NAN}), ValueError, "LoRA.alpha_pattern"),
    (dict(rank_pattern={"query": 0}), ValueError, "rank"),
]


@pytest.mark.parametrize("kwargs,error,says", METHOD_CASES, ids=[str(c[0]) for c in METHOD_CASES])
def test_bad_method_arguments_are_refused_at_attach(plain, kwargs, error, says):
    model, before = plain
    with pytest.raises(error) as err:
        dt.attach(model, dt.LoRA(targets=["query"], **kwargs))
    assert says in str(err.value)
    assert dt.adapters(model) == []
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", [dt.AdaLoRA(init_r=True), dt.OFT(block_size="8"), dt.VeRA(d_init=NAN),
                                    dt.SoRA(threshold=INF), dt.S2FT(seed=1.5)],
                         ids=["adalora", "oft", "vera", "sora", "s2ft"])
def test_field_checks_cover_every_method(plain, method):
    model, before = plain
    with pytest.raises((TypeError, ValueError), match=type(method).__name__ + r"\.\w+"):
        dt.attach(model, method)
    assert_unchanged(model, before)


# -- verbs ------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def adapted(minilm_dir):
    model = make_minilm(minilm_dir, seed=0)
    dt.attach(model, dt.LoRA(r=2, targets=["query", "value"], modules_to_save=["classifier"]), name="a")
    randomize(model, "a")
    return model


@pytest.mark.parametrize("weights", [NAN, INF, -INF, 1e30, [NAN], {"a": INF}, "0.5", True],
                         ids=["nan", "inf", "-inf", "1e30", "list-nan", "dict-inf", "string", "bool"])
def test_bad_merge_weights_leave_the_base_intact(adapted, minilm_batch, weights):
    y = logits(adapted, minilm_batch)
    before = snapshot(adapted)
    with pytest.raises((TypeError, ValueError), match="merge weight|merging adapter 'a'"):
        dt.merge(adapted, weights=weights)
    assert_unchanged(adapted, before)
    assert all(not layer.merged for _, layer in dt.model.adapted_layers(adapted))
    dt.merge(adapted)  # still mergeable, and exact
    dt.unmerge(adapted)
    assert torch.allclose(logits(adapted, minilm_batch), y, atol=1e-5)


def test_merge_overflow_in_half_precision_rolls_back_every_layer(adapted):
    adapted.half()
    before = snapshot(adapted)
    with pytest.raises(ValueError, match="unmerging could not restore the base"):
        dt.merge(adapted, weights=1e6)  # the first layers overflow float16
    assert_unchanged(adapted, before)


def test_merging_again_with_another_weight_is_refused(adapted):
    dt.merge(adapted)
    before = snapshot(adapted)
    with pytest.raises(ValueError, match="already merged with weight 1.0; dt.unmerge"):
        dt.merge(adapted, weights=0.5)
    assert_unchanged(adapted, before)
    dt.merge(adapted)  # the same weight again is a no-op
    assert_unchanged(adapted, before)


def test_attach_or_load_active_while_another_is_merged_is_refused(adapted, good, tmp_path):
    dt.merge(adapted)
    before = snapshot(adapted)
    with pytest.raises(ValueError, match=r"merged into the weights.*dt.unmerge\(model\) first, or pass activate="):
        dt.attach(adapted, dt.LoRA(r=2, targets=["key"]), name="b")
    with pytest.raises(ValueError, match=r"merged into the weights.*activate=False"):
        dt.load(adapted, good["own"], name="c")
    assert dt.adapters(adapted) == ["a"]
    assert_unchanged(adapted, before)
    dt.attach(adapted, dt.LoRA(r=2, targets=["key"]), name="b", activate=False)  # allowed: "a" stays active
    assert dt.active_adapters(adapted) == ["a"]


@pytest.mark.parametrize("name", ["a\n", "b\n", "x/y", "", "base", 5])
def test_bad_adapter_names(plain, name):
    model, before = plain
    with pytest.raises(ValueError, match="adapter name"):
        dt.attach(model, dt.LoRA(r=2, targets=["query"]), name=name)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kw", [dict(rank=0), dict(rank=-1), dict(rank=True), dict(rank=2.5), dict(energy=0),
                                dict(energy=-0.5), dict(energy=1.5), dict(energy=NAN)],
                         ids=lambda kw: str(kw))
def test_export_rank_and_energy_are_checked_not_rounded(minilm_dir, tmp_path, kw):
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.SpIEL(density=0.01, targets=["query"]), name="sp")
    with pytest.raises((TypeError, ValueError), match="rank|energy"):
        dt.save(model, tmp_path / "out", format="peft", **kw)
    assert not (tmp_path / "out").exists()


def test_unload_of_a_plain_model_is_a_clear_error(plain):
    model, before = plain
    with pytest.raises(ValueError, match="no deltatune adapters"):
        dt.unload(model)
    assert_unchanged(model, before)


def test_adapter_names_after_unload_is_refused(adapted, minilm_batch):
    y = logits(adapted, minilm_batch)
    dt.unload(adapted)
    base = logits(adapted, minilm_batch)
    with pytest.raises(ValueError, match="no deltatune adapters any more"):
        adapted(**minilm_batch, adapter_names=["a"] * 6)
    assert torch.equal(logits(adapted, minilm_batch), base)  # plain calls are untouched
    dt.attach(adapted, dt.LoRA(r=2, targets=["query"]), name="again")  # attaching again routes rows again
    out = adapted(**minilm_batch, adapter_names=["again"] * 6).logits
    assert out.shape == y.shape


def test_combine_weights_must_be_finite(adapted):
    dt.attach(adapted, dt.LoRA(r=2, targets=["query"]), name="b", activate=False)
    before = snapshot(adapted)
    with pytest.raises(ValueError, match="weight 1 must be a finite number"):
        dt.combine(adapted, ["a", "b"], weights=[1.0, NAN])
    assert_unchanged(adapted, before)
    assert dt.adapters(adapted) == ["a", "b"]


def test_attach_refuses_deltas_built_from_a_nan_base(minilm_dir):
    model = make_minilm(minilm_dir)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight[0, 0] = NAN
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"OLoRA built {Q0}\.A, which holds .* NaN/inf.*base weight finite"):
        dt.attach(model, dt.OLoRA(r=2, targets=["query"]))
    assert dt.adapters(model) == []
    for k, v in model.state_dict().items():  # NaN != NaN: compare with equal_nan
        assert torch.allclose(v, before[k], equal_nan=True, rtol=0, atol=0)


def test_config_section_method_types_are_checked_in_run_yaml():
    from deltatune.train.config import parse_method

    with pytest.raises(ValueError, match="LoRA.alpha must be a finite number, got nan"):
        parse_method({"name": "lora", "alpha": NAN})  # YAML's .nan
    with pytest.raises(ValueError, match="LoRA.alpha must not be 0"):
        parse_method({"name": "lora", "alpha": 0})
