"""The command line on real adapters, and the demo end to end."""
from __future__ import annotations

import json

import torch
from helpers import SHARED, logits, make_minilm, randomize

import deltatune as dt
from deltatune.cli import main
from deltatune.io import read_record
from deltatune.train.trainer import read_metrics


def _saved(minilm_dir, tmp_path):
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.PiSSA(r=4, targets=["query", "value"], modules_to_save=["classifier"]), name="cli")
    randomize(model, "cli")
    dt.save(model, tmp_path / "a")
    return model


def test_inspect_prints_method_modules_and_parameters(minilm_dir, tmp_path, capsys):
    model = _saved(minilm_dir, tmp_path)
    assert main(["inspect", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "method    pissa" in out and "13 (12 lowrank, 1 full)" in out
    assert "bert.encoder.layer.0.attention.self.query  lowrank    384x384  8" in out  # rank 2r after residual fold
    total = sum(t.numel() for d in dt.deltas(model, "cli").values() for t in d.tensors().values())
    assert f"params    {total:,}" in out
    assert main(["inspect", str(tmp_path / "a"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == total and len(info["modules"]) == 13


def test_export_to_peft_loads_in_peft(minilm_dir, minilm_batch, tmp_path):
    from peft import PeftModel

    model = _saved(minilm_dir, tmp_path)
    assert main(["export", str(tmp_path / "a"), "--to", "peft", str(tmp_path / "p")]) == 0
    ref = PeftModel.from_pretrained(make_minilm(minilm_dir, seed=3), tmp_path / "p").eval()
    torch.testing.assert_close(logits(ref, minilm_batch), logits(model, minilm_batch), atol=1e-5, rtol=0)


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatune inspect: error:") and "no adapter_config.json" in err


def test_train_from_a_yaml_run_config(minilm_dir, minilm_batch, tmp_path, capsys):
    import yaml

    sst2 = SHARED / "data" / "glue" / "SST-2"
    config = {"model": {"path": "minilm", "task": "classification"},
              "data": {"train": str(sst2 / "train.tsv"), "eval": str(sst2 / "dev.tsv"), "text": "sentence",
                       "max_length": 48, "max_train_rows": 32, "max_eval_rows": 16},
              "method": {"name": "lora", "r": 4, "targets": ["query", "value"]},
              "train": {"batch_size": 8, "max_steps": 2, "progress": False}, "output_dir": "run"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["adapter_path"] == str(tmp_path / "run" / "adapter")
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["eval"] == {k: v for k, v in last.items() if k.startswith("eval_")}
    assert (summary["eval"]["eval_accuracy"] * 16).is_integer()  # scored on exactly max_eval_rows=16 rows
    model = dt.load(make_minilm(minilm_dir), tmp_path / "run" / "adapter")
    assert len(dt.deltas(model, "default")) == 6 * 2 + 1  # query, value in 6 layers + the classifier head

    config["data"]["text"] = "sentense"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatune train: error:") and "no column 'sentense'" in err and "\n" not in err.strip()


def test_train_resumes_from_a_checkpoint_on_the_command_line(minilm_dir, tmp_path, capsys):
    """``deltatune train RUN.yaml --resume last`` continues an AdaLoRA run from its newest checkpoint and ends with
    the adapter of the uninterrupted run (same ranks, same values)."""
    import shutil

    import yaml

    sst2 = SHARED / "data" / "glue" / "SST-2"
    config = {"model": {"path": "minilm", "task": "classification"},
              "data": {"train": str(sst2 / "train.tsv"), "text": "sentence", "max_length": 32, "max_train_rows": 32},
              "method": {"name": "adalora", "init_r": 4, "target_r": 2, "targets": ["query", "value"],
                         "t_init": 1, "t_final": 1, "delta_t": 1},
              "train": {"batch_size": 8, "max_steps": 4, "save_every": 2, "progress": False, "lr": 5e-3},
              "output_dir": "run"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    full = read_record(tmp_path / "run" / "adapter")
    shutil.rmtree(tmp_path / "run" / "adapter")
    assert main(["train", str(tmp_path / "run.yaml"), "--resume", "last"]) == 0
    resumed = read_record(tmp_path / "run" / "adapter")
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert steps == [3, 4]  # it continued from checkpoint-2 rather than starting over
    assert resumed.modules == full.modules
    for mod, ts in full.tensors.items():
        assert all(torch.equal(ts[k], resumed.tensors[mod][k]) for k in ts), mod
    capsys.readouterr()
    assert main(["train", str(tmp_path / "run.yaml"), "--resume", str(tmp_path / "nope")]) == 2
