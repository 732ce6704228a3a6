"""YAML run configs: validation, heads, causal LM and classification runs, safety options."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ALPACA, DATA, ROOT, SST2, minilm

import deltatune as dt
from deltatune.train import load_config, run_config
from deltatune.train.config import with_head


# -- run configs ----------------------------------------------------------------------------------------------------
def test_config_validation(tmp_path):
    good = {"model": {"path": "minilm", "task": "classification"},
            "data": {"train": "train.tsv", "text": "sentence"}, "output_dir": "out"}
    cfg = load_config(good)
    assert cfg.method.name == "lora" and cfg.data.max_length == 128
    assert cfg.data.train == str(Path.cwd() / "train.tsv")

    def bad(match, **section):
        with pytest.raises(ValueError, match=match):
            load_config({**good, **section})

    bad(r"unknown key\(s\) \['txt'\] in 'data'; allowed: \['train', 'eval', 'text'",
        data={"train": "t.tsv", "txt": "sentence"})
    bad(r"unknown key\(s\) \['rank'\] for method 'lora'; allowed: .*'r'", method={"name": "lora", "rank": 8})
    bad(r"unknown method 'lorax'", method={"name": "lorax"})
    bad(r"unknown training argument.*'learning_rate'.*allowed", train={"learning_rate": 1.0})
    bad(r"unknown top-level key\(s\) \['trian'\]", trian={})
    bad(r"model.task must be one of", model={"path": "minilm", "task": "seq2seq"})
    bad(r"data.text", data={"train": "t.tsv"})
    bad(r"exactly one of data.prompt", model={"path": "smollm2", "task": "causal_lm"},
        data={"train": "t.json", "response": "output"})
    bad(r"'model' needs \['path'\]", model={"task": "classification"})
    bad(r"LoRA.r must be a positive integer, got 0", method={"name": "lora", "r": 0})
    bad(r"training argument lr must be a number, got 'fast'", train={"lr": "fast"})
    bad(r"training argument batch_size must be an integer", train={"batch_size": 2.5})
    # YAML reads 1e-4 (no dot) as a string: numbers written that way are accepted
    numeric = yaml.safe_load("lr: 1e-4\nweight_decay: 1e-2\nmax_steps: 10\n")
    assert numeric["lr"] == "1e-4"
    args = load_config({**good, "train": numeric}).train
    assert (args.lr, args.weight_decay, args.max_steps) == (1e-4, 1e-2, 10)

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(good))
    assert load_config(tmp_path / "run.yaml").data.train == str(tmp_path / "train.tsv")  # relative to the file
    example = load_config(ROOT / "examples" / "sst2_lora.yaml")
    assert Path(example.data.train).is_file() and Path(example.data.eval).is_file()


def test_classification_head_is_added_to_modules_to_save(minilm_dir):
    model = minilm(minilm_dir)
    assert with_head(dt.LoRA(), model).modules_to_save == ["classifier"]
    assert with_head(dt.LoRA(modules_to_save=["classifier"]), model).modules_to_save == ["classifier"]
    assert with_head(dt.LoRA(modules_to_save=["pooler.dense"]), model).modules_to_save == ["pooler.dense",
                                                                                            "classifier"]


def test_run_config_causal_lm_end_to_end(smollm_dir, tmp_path):
    config = {
        "model": {"path": "smollm2", "task": "causal_lm"},
        "data": {"train": str(ALPACA), "eval": str(ALPACA), "template": "alpaca", "response": "output",
                 "max_length": 96, "max_train_rows": 8, "max_eval_rows": 2},
        "method": {"name": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
        "train": {"lr": 1e-3, "batch_size": 4, "max_steps": 2, "progress": False},
        "output_dir": "out",
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = run_config(tmp_path / "run.yaml")
    out = tmp_path / "out"
    assert result["steps"] == 2 and math.isfinite(result["train_loss"]) and math.isfinite(result["eval"]["eval_loss"])
    assert result["adapter_path"] == str(out / "adapter")
    assert {"adapter", "metrics.jsonl", "metrics.png", "config.yaml", "results.json"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["method"]["r"] == 4 and len(saved["modules"]) == 2 * 30  # q_proj and v_proj in 30 layers
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["path"] == str(smollm_dir)
    assert json.loads((out / "results.json").read_text())["eval"] == result["eval"]


def test_run_config_classification_from_the_example(tmp_path):
    config = yaml.safe_load((ROOT / "examples" / "sst2_lora.yaml").read_text())
    config["data"].update(train=str(SST2 / "train.tsv"), eval=str(SST2 / "dev.tsv"), max_train_rows=64,
                          max_eval_rows=32)
    config["train"].update(batch_size=16, epochs=0.5, eval_every=None, progress=False)
    config["output_dir"] = str(tmp_path / "out")
    result = run_config(config)
    assert result["steps"] == 2 and result["label2id"] == {"0": 0, "1": 1}
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["method"]["modules_to_save"] == ["classifier"]  # added automatically
    assert saved["modules"]["classifier"]["structure"] == "full"
    assert (result["eval"]["eval_accuracy"] * 32).is_integer()  # scored on exactly max_eval_rows=32 rows
    last = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["eval"] == {k: v for k, v in last.items() if k.startswith("eval_")}


def test_run_yaml_takes_peft_names_for_method_fields():
    from deltatune.train.config import parse_method

    m = parse_method({"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query"], "lora_dropout": 0.1})
    assert (m.alpha, m.targets, m.dropout) == (8, ["query"], 0.1)
    with pytest.raises(ValueError, match="lora_alpah"):
        parse_method({"name": "lora", "lora_alpah": 8})


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
