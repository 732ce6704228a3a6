"""deltatune.train data: read_rows, encodings, headerless files, datasets sources."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import ALPACA, DATA, SST2, tokenizer

from deltatune.train import (
    Collator,
    encode_classification,
    encode_instruction,
    encode_instructions,
    label_map,
    read_rows,
)


ROWS = [{"text": "a fine, warm film", "label": "pos"}, {"text": 'flat "jokes"', "label": "neg"},
        {"text": "so-so", "label": "neg"}]


# -- data -----------------------------------------------------------------------------------------------------
def test_read_rows_every_file_type(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    with open(tmp_path / "d.csv", "w", newline="") as f:  # quoted fields: '"a fine, warm film"'
        w = csv.DictWriter(f, ["text", "label"])
        w.writeheader()
        w.writerows(ROWS)
    tsv = ["text\tlabel"] + [f"{r['text']}\t{r['label']}" for r in ROWS]  # GLUE style: quotes are plain text
    (tmp_path / "d.tsv").write_text("\n".join(tsv) + "\n")
    for name in ("d.jsonl", "d.json", "d.csv", "d.tsv"):
        assert read_rows(tmp_path / name) == ROWS, name
        assert read_rows(tmp_path / name, max_rows=2) == ROWS[:2], name


def test_read_rows_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        read_rows(tmp_path / "nope.tsv")
    (tmp_path / "d.parquet").write_text("x")
    with pytest.raises(ValueError, match=r"\.parquet.*\.jsonl"):
        read_rows(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps({"text": "a"}))
    with pytest.raises(ValueError, match="list of objects"):
        read_rows(tmp_path / "d.json")
    (tmp_path / "d.tsv").write_text("text\tlabel\na\t1\tEXTRA\n")
    with pytest.raises(ValueError, match="line 2: the number of fields differs"):
        read_rows(tmp_path / "d.tsv")
    (tmp_path / "d.csv").write_text("text,label\na\n")
    with pytest.raises(ValueError, match="line 2: the number of fields differs"):
        read_rows(tmp_path / "d.csv")


def test_real_data_slices():
    sst = read_rows(SST2 / "train.tsv", max_rows=50)
    assert len(sst) == 50 and set(sst[0]) == {"sentence", "label"} and {r["label"] for r in sst} == {"0", "1"}
    alpaca = read_rows(ALPACA, max_rows=10)
    assert len(alpaca) == 10 and set(alpaca[0]) == {"instruction", "input", "output"}


def test_labels_and_classification_encoding(minilm_dir):
    assert label_map([1, 0, 1]) == {"0": 0, "1": 1}
    assert label_map(["2", "10", "0"]) == {"0": 0, "2": 2, "10": 10}  # integers keep their value
    assert label_map(["pos", "neg", "pos"]) == {"neg": 0, "pos": 1}
    assert label_map([" 1", "0"]) == {"0": 0, "1": 1}
    tok = tokenizer(minilm_dir)
    rte = read_rows(DATA / "glue" / "RTE" / "train.tsv", max_rows=20)
    ex, label2id = encode_classification(rte, tok, "sentence1", "label", text_pair="sentence2", max_length=48)
    assert label2id == {"entailment": 0, "not_entailment": 1}
    assert all(len(e["input_ids"]) <= 48 for e in ex) and any(1 in e["token_type_ids"] for e in ex)
    assert [e["labels"] for e in ex] == [label2id[r["label"]] for r in rte]
    with pytest.raises(KeyError, match="'sentence'"):
        encode_classification(rte, tok, "sentence", "label")
    spaced, _ = encode_classification([{"t": "good", "y": " 1"}, {"t": "bad", "y": "0"}], tok, "t", "y")
    assert [e["labels"] for e in spaced] == [1, 0]  # " 1" is the integer label 1
    with pytest.raises(ValueError, match="not in the label map"):
        encode_classification(ROWS, tok, "text", "label", label2id={"pos": 0})

    batch = Collator(pad_id=tok.pad_token_id)(ex[:4])
    width = max(len(e["input_ids"]) for e in ex[:4])
    assert batch["input_ids"].shape == (4, width) and batch["labels"].shape == (4,)
    for i, e in enumerate(ex[:4]):
        n = len(e["input_ids"])
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()


def test_prompt_tokens_are_masked(smollm_dir):
    tok = tokenizer(smollm_dir)
    rows = read_rows(ALPACA, max_rows=6)
    ex = encode_instructions(rows, tok, response="output", template="alpaca", max_length=512)
    for row, e in zip(rows, ex):
        prompt = "### Input:" in tok.decode(e["input_ids"])
        assert prompt == bool(row["input"].strip())  # the alpaca template has a variant without input
        n_prompt = sum(1 for t in e["labels"] if t == -100)
        assert e["labels"][:n_prompt] == [-100] * n_prompt  # all masked labels come first: the prompt
        assert e["labels"][n_prompt:] == e["input_ids"][n_prompt:]
        assert tok.decode(e["input_ids"][n_prompt:-1]) == row["output"] and e["input_ids"][-1] == tok.eos_token_id
        assert tok.decode(e["input_ids"][:n_prompt]).endswith("### Response:\n")

    one = encode_instruction("Q: 2+2?\nA:", " 4", tok)
    p = tok("Q: 2+2?\nA:")["input_ids"]
    assert one["labels"] == [-100] * len(p) + one["input_ids"][len(p):]

    batch = Collator(pad_id=tok.eos_token_id)(ex[:3])
    for i, e in enumerate(ex[:3]):
        n = len(e["input_ids"])
        assert batch["labels"][i, n:].eq(-100).all() and batch["attention_mask"][i, n:].eq(0).all()

    with pytest.warns(UserWarning, match="dropped 1 of 2 rows"):
        short = encode_instructions(rows[:2], tok, response="output", prompt="instruction", max_length=12)
    assert all(len(e["input_ids"]) <= 12 for e in short)
    with pytest.raises(ValueError, match="max_length"):
        encode_instructions(rows[:2], tok, response="output", template="alpaca", max_length=8)
    with pytest.raises(KeyError, match="'question'"):
        encode_instructions(rows[:2], tok, response="output", template="{question}")
    with pytest.raises(KeyError, match="'answer'"):
        encode_instructions(rows[:2], tok, response="answer", prompt="instruction")


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
