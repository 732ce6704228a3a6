"""Issue 15, items A7 (data sources), B12 (exact merge round trips), B13 (module paths vs public names), B14 (run
configs cannot turn on remote code)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import deltatune as dt

from helpers import DATA, ROOT, make_minilm

README = ROOT / "README.md"


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter with this checkout's ``src`` first on the path (import order matters)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


# -- B13: public names and module paths ---------------------------------------------------------------------------
def readme_references() -> list[str]:
    """Every ``dt.<name>`` / ``deltatune.<a>.<b>`` dotted reference and every ``from deltatune.x import a, b`` name in
    the README (code blocks and inline code)."""
    text = README.read_text()
    refs = {m.group(0).rstrip(".") for m in re.finditer(r"\b(?:dt|deltatune)(?:\.[A-Za-z_]\w*)+", text)}
    for mod, names in re.findall(r"from (deltatune[\w.]*) import ([\w, ()]+)", text):
        refs |= {f"{mod}.{n.strip()}" for n in names.replace("(", "").replace(")", "").split(",") if n.strip()}
    refs |= {f"deltatune.{m}" for m in re.findall(r"import deltatune\.([\w.]+)", text)}
    return sorted(r.replace("dt.", "deltatune.", 1) if r.startswith("dt.") else r for r in refs)


def test_readme_references_resolve_in_a_fresh_interpreter():
    refs = readme_references()
    assert "deltatune.combine.ties" in refs and "deltatune.combine" in refs and len(refs) > 40
    code = f"""
        import importlib, json, deltatune
        bad = []
        for ref in {refs!r}:
            parts = ref.split(".")
            for i in range(2, len(parts) + 1):  # import what a user would import (deltatune.zoo, deltatune.train)
                try:
                    importlib.import_module(".".join(parts[:i]))
                except ImportError:
                    break
            obj = deltatune
            for part in parts[1:]:  # then attribute access from the package, as written in the README
                try:
                    obj = getattr(obj, part)
                except AttributeError as e:
                    bad.append(f"{{ref}}: {{e}}")
                    break
        print(json.dumps(bad))
    """
    proc = _fresh_python(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("first", ["import deltatune.combine.ops as ops",
                                   "from deltatune.combine import ops",
                                   "import deltatune as dt; import deltatune.combine.ops as ops"])
def test_subpackage_imports_work_in_any_order(first):
    proc = _fresh_python(f"""
        {first}
        import deltatune, deltatune.deltas, deltatune.compress, deltatune.extract, deltatune.interference
        import deltatune.combine.merge
        assert ops.ties is deltatune.combine.ties
        assert deltatune.deltas.LowRankDelta is deltatune.LowRankDelta
        assert deltatune.compress.load_compressed is deltatune.load_compressed
        assert callable(deltatune.combine) and callable(deltatune.deltas) and callable(deltatune.compress)
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_no_public_name_shadows_a_submodule():
    """Generic: every submodule of the package is reachable as an attribute (a function re-exported under a
    module's name is the module made callable, never a replacement)."""
    proc = _fresh_python("""
        import importlib, pkgutil, sys, deltatune
        bad = []
        for info in pkgutil.walk_packages(deltatune.__path__, "deltatune."):
            if info.name.endswith(("__main__", ".demo", ".cli")):
                continue
            mod = importlib.import_module(info.name)
            parent, _, leaf = info.name.rpartition(".")
            if getattr(sys.modules[parent], leaf) is not mod:
                bad.append(info.name)
        print(bad)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_callable_modules_still_run_their_function(minilm_dir):
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.LoRA(r=2, targets=["query"]), name="a")
    dt.attach(model, dt.LoRA(r=2, targets=["query"]), name="b", activate=False)
    found = dt.deltas(model, "a")
    assert len(found) == 6 and all(isinstance(d, dt.deltas.LowRankDelta) for d in found.values())
    assert dt.deltas is sys.modules["deltatune.deltas"]
    dt.combine(model, ["a", "b"], name="ab")  # the function, called through the module
    assert "ab" in dt.adapters(model)
    assert dt.combine.ties is sys.modules["deltatune.combine.ops"].ties


# -- B12: merge / unmerge round trips are exact for every structure ----------------------------------------------------
TARGETS = r"bert\.encoder\.layer\.0\.attention\.output\.dense"  # one 384 x 384 layer: 100 round trips stay quick
STACKS = {  # adapters attached (and active) together
    "lora": [dt.LoRA(r=4, targets=TARGETS)],
    "s2ft": [dt.S2FT(targets=TARGETS, o_ratio=0.1, d_ratio=0.0)],
    "spiel": [dt.SpIEL(density=0.05, targets=TARGETS)],
    "vera": [dt.VeRA(r=16, targets=TARGETS)],
    "head": [dt.LoRA(r=2, targets=TARGETS, modules_to_save=["classifier"])],
    "oft": [dt.OFT(block_size=32, targets=TARGETS)],
    "oft+lora": [dt.OFT(block_size=32, targets=TARGETS), dt.LoRA(r=4, targets=TARGETS)],
}


def _stacked(minilm_dir, methods, dtype=torch.float32):
    """MiniLM with the adapters attached, every delta parameter drawn at random (so merges change the weights),
    all of them active."""
    model = make_minilm(minilm_dir).to(dtype)
    names = [f"a{i}" for i in range(len(methods))]
    for name, method in zip(names, methods):
        dt.attach(model, method, name=name)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in names:
            for delta in dt.deltas(model, name).values():
                for p in delta.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))
    dt.set_active(model, names)
    return model


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(model, snap) -> list[str]:
    return [k for k, v in model.state_dict().items() if not torch.equal(v, snap[k])]


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_merge_round_trips_and_disabled_blocks_are_bit_exact(minilm_dir, minilm_batch, stack):
    model = _stacked(minilm_dir, STACKS[stack])
    with torch.no_grad():
        live = model(**minilm_batch).logits
    base = _snapshot(model)

    dt.merge(model)
    assert _changed(model, base), "the merge must change the base weights"
    with torch.no_grad():
        merged_out = model(**minilm_batch).logits
    torch.testing.assert_close(merged_out, live, atol=2e-5, rtol=1e-4)  # merged computes what the live adapters did
    dt.unmerge(model)
    assert _changed(model, base) == []

    for _ in range(100):
        dt.merge(model)
        dt.unmerge(model)
    assert _changed(model, base) == []

    dt.merge(model)
    merged = _snapshot(model)
    for i in range(100):
        with dt.disabled(model):
            if i == 0:
                assert _changed(model, base) == []  # inside: the plain base weights, bit for bit
    assert _changed(model, merged) == []  # disabled() leaves the merged weights where they were
    dt.unmerge(model)
    assert _changed(model, base) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_unmerge_restores_the_stored_weights(minilm_dir, dtype):
    """Merging into half-precision weights rounds (the update is accumulated in float32, the sum stored in the
    weight's dtype); unmerging still gives back the original bits."""
    model = _stacked(minilm_dir, STACKS["oft+lora"], dtype)
    base = _snapshot(model)
    for _ in range(20):
        dt.merge(model)
        dt.unmerge(model)
    assert _changed(model, base) == []


def test_unmerge_out_of_order_is_exact(minilm_dir):
    """LIFO: unmerging the first of two merged adapters takes the later one out and back in, exactly."""
    model = _stacked(minilm_dir, [dt.LoRA(r=4, targets=TARGETS), dt.VeRA(r=16, targets=TARGETS)])
    base = _snapshot(model)
    dt.merge(model, ["a0", "a1"])
    dt.unmerge(model, "a0")
    only_a1 = _snapshot(model)
    dt.unmerge(model, "a1")
    assert _changed(model, base) == []
    dt.merge(model, ["a1"])
    assert _changed(model, only_a1) == []


# -- B14: a run config cannot turn on remote code or network loading ------------------------------------------------------
CUSTOM_CODE = '''
import os, pathlib
from transformers import BertConfig, BertForSequenceClassification

pathlib.Path(os.environ["DT_TEST_MARKER"]).write_text("the model folder's code ran")


class CustomConfig(BertConfig):
    pass


class CustomModel(BertForSequenceClassification):
    config_class = CustomConfig
'''


def _remote_code_model(minilm_dir, folder: Path) -> Path:
    """MiniLM whose config.json points (auto_map) at Python code in the folder; importing it writes a marker file."""
    folder.mkdir()
    for f in Path(minilm_dir).iterdir():
        if f.is_file():
            (folder / f.name).symlink_to(f)
    (folder / "config.json").unlink()
    config = json.loads((Path(minilm_dir) / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForSequenceClassification": "custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(CUSTOM_CODE)
    return folder


def _run_yaml(tmp_path, model_config: dict, model_path="minilm") -> Path:
    import yaml

    sst2 = DATA / "glue" / "SST-2"
    config = {"model": {"path": str(model_path), "task": "classification", "config": model_config},
              "data": {"train": str(sst2 / "dev.tsv"), "text": "sentence", "max_length": 32, "max_train_rows": 8},
              "method": {"name": "lora", "r": 2, "targets": ["query"]},
              "train": {"batch_size": 4, "max_steps": 1, "progress": False, "plot": False}, "output_dir": "run"}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("key, value", [("trust_remote_code", True), ("code_revision", "main")])
def test_run_config_cannot_trust_remote_code_by_itself(minilm_dir, tmp_path, monkeypatch, capsys, key, value):
    from deltatune.cli import main
    from deltatune.train.config import load_config

    marker = tmp_path / "marker"
    monkeypatch.setenv("DT_TEST_MARKER", str(marker))
    model = _remote_code_model(minilm_dir, tmp_path / "custom-model")
    run = _run_yaml(tmp_path, {key: value}, model)
    assert main(["train", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deltatune train: error: model.config." + key) and "--trust-remote-code" in err
    assert str(run) in err and "\n" not in err
    assert not marker.exists() and not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_config(run)
    assert load_config(run, trust_remote_code=True).model.config["trust_remote_code"] is True


@pytest.mark.parametrize("key, value", [("local_files_only", False), ("revision", "main"), ("token", "hf_x"),
                                        ("use_auth_token", True), ("force_download", True),
                                        ("use_safetensors", False), ("from_tf", True),
                                        ("attn_implementation", "kernels-community/flash-attn")])
def test_run_config_refuses_network_and_pickle_loading_options(tmp_path, capsys, key, value):
    from deltatune.cli import main

    run = _run_yaml(tmp_path, {key: value, "hidden_dropout_prob": 0.0})
    assert main(["train", str(run), "--trust-remote-code"]) == 2  # the flag trusts code, not the network
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"deltatune train: error: model.config.{key} in {run}") and "loading option" in err
    assert not (tmp_path / "run").exists()


def test_trust_remote_code_flag_runs_the_model_folder_code(minilm_dir, tmp_path):
    """With the caller's flag the folder's own classes load (locally) and train; model-config fields still apply."""
    model = _remote_code_model(minilm_dir, tmp_path / "custom-model")
    run = _run_yaml(tmp_path, {"hidden_dropout_prob": 0.0}, model)
    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "DT_TEST_MARKER": str(marker),
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "deltatune.cli", "train", str(run), "--trust-remote-code"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert marker.exists() and json.loads(proc.stdout)["steps"] == 1
    import yaml
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["config"] == {"hidden_dropout_prob": 0.0, "trust_remote_code": True}


# -- A7: headerless files, datasets.Dataset and load_dataset-style sources through the run-config path --------------
COLA = DATA / "glue" / "CoLA"
COLA_COLUMNS = ["source", "label", "original_label", "sentence"]


def _cola_lines(split: str, n: int) -> list[list[str]]:
    return [line.rstrip("\n").split("\t") for line in (COLA / f"{split}.tsv").read_text().splitlines()[:n]]


def _config(tmp_path, data: dict, steps: int = 1) -> dict:
    return {"model": {"path": "minilm", "task": "classification"},
            "data": {"text": "sentence", "max_length": 32, **data},
            "method": {"name": "lora", "r": 2, "targets": ["query"]},
            "train": {"batch_size": 4, "max_steps": steps, "progress": False, "plot": False},
            "output_dir": str(tmp_path / "run")}


def _encoded(config: dict, path: Path):
    """The real run path up to the encoded examples: load_config (YAML file) then load_data."""
    import yaml
    from transformers import AutoTokenizer

    from deltatune.train.config import load_config, load_data
    from deltatune.zoo import minilm_path

    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    return cfg, tok, load_data(cfg, tok)


def test_headerless_cola_with_columns_trains_from_the_cli(tmp_path, capsys):
    import yaml

    from deltatune.cli import main

    config = _config(tmp_path, {"train": str(COLA / "train.tsv"), "eval": str(COLA / "dev.tsv"),
                                "columns": COLA_COLUMNS, "max_train_rows": 24, "max_eval_rows": 8})
    cfg, tok, (train_ex, eval_ex, label2id) = _encoded(config, tmp_path / "run.yaml")
    lines = _cola_lines("train", 24)
    assert len(train_ex) == 24 and len(eval_ex) == 8 and label2id == {"0": 0, "1": 1}
    assert [ex["labels"] for ex in train_ex] == [int(f[1]) for f in lines]  # the first line is a row, not a header
    assert train_ex[0]["input_ids"] == tok(lines[0][3], truncation=True, max_length=32)["input_ids"]
    assert [ex["labels"] for ex in eval_ex] == [int(f[1]) for f in _cola_lines("dev", 8)]

    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 1 and summary["label2id"] == {"0": 0, "1": 1}
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["columns"] == COLA_COLUMNS


def test_headerless_file_errors_name_the_fix(tmp_path, capsys):
    from deltatune.cli import main
    import yaml

    cases = [({"train": str(COLA / "train.tsv")}, "data.columns: [...]"),  # CoLA read as if it had a header
             ({"train": str(COLA / "train.tsv"), "columns": ["label", "sentence"]}, "differs from data.columns"),
             ({"train": str(COLA / "test.tsv"), "columns": ["index", "sentence"]}, "has a header line"),
             ({"train": str(COLA / "train.tsv"), "columns": ["a", "a", "b", "c"]}, "repeats a name"),
             ({"train": str(DATA / "glue" / "SST-2" / "dev.tsv"), "columns": "sentence"}, "non-empty list")]
    for data, message in cases:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(_config(tmp_path, data)))
        assert main(["train", str(tmp_path / "bad.yaml")]) == 2, data
        err = capsys.readouterr().err.strip()
        assert err.startswith("deltatune train: error:") and message in err and "\n" not in err, err


def test_load_dataset_spec_of_local_files(tmp_path):
    """{dataset: csv, data_files: ...} goes through datasets.load_dataset; relative files resolve against the YAML."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cola.tsv").symlink_to(COLA / "train.tsv")
    spec = {"dataset": "csv", "data_files": "data/cola.tsv", "delimiter": "\t", "column_names": COLA_COLUMNS,
            "quoting": 3}
    cfg, _, (train_ex, _, label2id) = _encoded(_config(tmp_path, {"train": spec, "max_train_rows": 24}),
                                               tmp_path / "run.yaml")
    assert cfg.data.train["data_files"] == [str(tmp_path / "data" / "cola.tsv")]
    assert [ex["labels"] for ex in train_ex] == [int(f[1]) for f in _cola_lines("train", 24)]
    assert label2id == {"0": 0, "1": 1}


@pytest.mark.parametrize("spec, message", [
    ({"dataset": "glue", "data_files": "x.csv"}, "never downloads"),
    ({"dataset": "nyu-mll/glue"}, "never downloads"),
    ({"dataset": "pandas", "data_files": "x.pkl"}, "never downloads"),
    ({"dataset": "csv", "data_files": "hf://datasets/nyu-mll/glue/cola/train.parquet"}, "local path"),
    ({"dataset": "csv", "data_files": "https://example.com/train.csv"}, "local path"),
    ({"dataset": "csv", "data_files": "missing.csv"}, "matches no file"),
    ({"dataset": "csv", "data_files": "x.csv", "revision": "main"}, "unknown key"),
])
def test_load_dataset_spec_refuses_the_hub(tmp_path, capsys, spec, message):
    import yaml

    from deltatune.cli import main

    (tmp_path / "x.csv").write_text("sentence,label\na,0\n")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(_config(tmp_path, {"train": spec})))
    assert main(["train", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deltatune train: error:") and message in err, err


def test_a_datasets_dataset_trains_through_run_config(tmp_path):
    """Python API: data.train / data.eval may be datasets.Dataset objects (string labels map to sorted ids)."""
    import datasets

    from deltatune.train import run_config

    lines = _cola_lines("train", 24)
    ds = datasets.Dataset.from_dict({"sentence": [f[3] for f in lines],
                                     "label": ["good" if f[1] == "1" else "bad" for f in lines]})
    result = run_config(_config(tmp_path, {"train": ds, "eval": ds.select(range(16, 24)), "max_train_rows": 20}, steps=2))
    assert result["steps"] == 2 and result["label2id"] == {"bad": 0, "good": 1}
    assert (result["eval"]["eval_accuracy"] * 8).is_integer()  # scored on the 8 eval rows
    import yaml
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["train"] == "Dataset (24 rows)"
    from deltatune.train.data import read_rows

    with pytest.raises(ValueError, match="datasets.Dataset has its own column names"):
        read_rows(ds, columns=["a"])


def test_conv1d_layers_unmerge_bit_exact():
    """GPT-2's Conv1D stores its weight transposed: the restore writes through the (out x in) view."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=100, n_positions=16)).eval()
    dt.attach(model, dt.LoRA(r=4, targets=["c_attn", "c_fc"]), name="a0")
    dt.attach(model, dt.OFT(block_size=16, targets=["c_proj"]), name="a1")
    with torch.no_grad():
        for name in ("a0", "a1"):
            for delta in dt.deltas(model, name).values():
                for p in delta.parameters():
                    p.add_(0.5 * torch.randn_like(p))
    dt.set_active(model, ["a0", "a1"])
    base = _snapshot(model)
    for _ in range(10):
        dt.merge(model)
        assert _changed(model, base)
        dt.unmerge(model)
    assert _changed(model, base) == []
