"""The command line on bad input: one line ``deltatune <cmd>: error: ...`` and exit 2 for every user error, a
traceback and a hint only for bugs, ``--debug`` for the traceback; and no command overwrites its own input."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from helpers import SHARED
from torch import nn

import deltatune as dt
from deltatune import cli
from deltatune.cli import main

SST2 = SHARED / "data" / "glue" / "SST-2"


def run_config(**changes) -> dict:
    cfg = {"model": {"path": "minilm", "task": "classification"},
           "data": {"train": str(SST2 / "train.tsv"), "text": "sentence", "max_length": 48, "max_train_rows": 16},
           "method": {"name": "lora", "r": 4, "targets": ["query", "value"]},
           "train": {"batch_size": 8, "max_steps": 1, "progress": False}, "output_dir": "run"}
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    return cfg


def one_line_error(capsys, argv, command, *needles) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"deltatune {command}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def saved_adapter(path):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    dt.attach(model, dt.LoRA(r=2, targets=["0", "2"]))
    with torch.no_grad():
        for d in dt.deltas(model, "default").values():
            for p in d.parameters():
                p.normal_()
    dt.save(model, path)
    return path


def test_bad_yaml_syntax(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("model: {path: minilm\n  bad: [\n")
    one_line_error(capsys, ["train", str(tmp_path / "run.yaml")], "train", "run.yaml", "line 2")


@pytest.mark.parametrize("key,value,needle", [
    ("method.alpha", "sixteen", "alpha in 'method' must be a number, got 'sixteen'"),
    ("method.r", "eight", "r in 'method' must be an integer"),
    ("data.max_length", -1, "data.max_length must be a positive integer"),
    ("data.max_train_rows", 0, "data.max_train_rows must be a positive integer"),
    ("model.num_labels", -2, "model.num_labels must be a positive integer"),
])
def test_bad_values_in_the_run_config(tmp_path, capsys, key, value, needle):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config(**{key: value})))
    one_line_error(capsys, ["train", str(tmp_path / "run.yaml")], "train", needle)


def test_an_existing_file_as_output(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config(output_dir="taken")))
    one_line_error(capsys, ["train", str(tmp_path / "run.yaml")], "train", "taken is an existing file")
    src = saved_adapter(tmp_path / "a")
    one_line_error(capsys, ["export", str(src), "--to", "peft", str(tmp_path / "taken")], "export",
                   "taken is an existing file")
    assert (tmp_path / "taken").read_text() == "x"


@pytest.mark.parametrize("damage", ["truncate-weights", "truncate-config", "empty-weights"])
def test_a_damaged_checkpoint_in_inspect_and_export(tmp_path, capsys, damage):
    src = saved_adapter(tmp_path / "a")
    name = "adapter_config.json" if damage == "truncate-config" else "adapter_model.safetensors"
    data = (src / name).read_bytes()
    (src / name).write_bytes(b"" if damage == "empty-weights" else data[: len(data) // 2])
    one_line_error(capsys, ["inspect", str(src)], "inspect", name)
    one_line_error(capsys, ["export", str(src), "--to", "peft", str(tmp_path / "p")], "export", name)
    assert not (tmp_path / "p").exists()


def test_export_refuses_to_overwrite_its_source(tmp_path, capsys):
    """B3: before, ``export SRC --to peft --rank 4 SRC`` replaced the source (rc 0)."""
    src = saved_adapter(tmp_path / "a")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    for out in (src, src / "peft", tmp_path):
        one_line_error(capsys, ["export", str(src), "--to", "peft", "--rank", "1", str(out)], "export",
                       "would overwrite its own input")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_merge_and_extract_refuse_their_inputs_as_output(tmp_path, capsys):
    a, b = saved_adapter(tmp_path / "a"), saved_adapter(tmp_path / "b")
    before = (a / "adapter_model.safetensors").read_bytes()
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump({"adapters": ["a", "b"], "output": "a"}))
    one_line_error(capsys, ["merge", str(tmp_path / "merge.yaml")], "merge", "would overwrite its own input")
    assert (a / "adapter_model.safetensors").read_bytes() == before
    from safetensors.torch import save_file

    save_file({"w.weight": torch.randn(4, 4)}, str(tmp_path / "base.safetensors"))
    save_file({"w.weight": torch.randn(4, 4)}, str(tmp_path / "tuned.safetensors"))
    one_line_error(capsys, ["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
                            str(tmp_path), "--rank", "1"], "extract", "would overwrite its own input")


def test_bugs_show_a_traceback_and_a_hint(monkeypatch, capsys, tmp_path):
    def broken(args):
        raise RuntimeError("boom")
    monkeypatch.setattr(cli, "describe", lambda folder: broken(None))
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom" in err and "this is a bug in deltatune" in err


def test_debug_shows_the_traceback_of_user_errors(tmp_path, capsys):
    for argv in (["--debug", "inspect", str(tmp_path / "missing")], ["inspect", "--debug", str(tmp_path / "missing")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("deltatune inspect: error:")


def test_the_installed_command_exits_2_without_a_traceback(tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config(**{"method.alpha": "sixteen"})))
    proc = subprocess.run([sys.executable, "-m", "deltatune.cli", "train", str(tmp_path / "run.yaml")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["deltatune train: error: key alpha in 'method' must be a number, "
                                                "got 'sixteen'"]
