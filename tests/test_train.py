"""deltatune.train: data loading, the trainer, the HF Trainer callback and YAML run configs, on real models/data."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

import deltatune as dt
from deltatune.train import (
    Collator,
    TrainArgs,
    encode_classification,
    encode_instruction,
    encode_instructions,
    eval_loader,
    evaluate,
    label_map,
    load_config,
    lr_factor,
    read_rows,
    run_config,
    set_seed,
    train,
)
from deltatune.train.config import with_head
from helpers import DATA, ROOT

SST2 = DATA / "glue" / "SST-2"
ALPACA = DATA / "alpaca" / "alpaca_5000.json"
ROWS = [{"text": "a fine, warm film", "label": "pos"}, {"text": 'flat "jokes"', "label": "neg"},
        {"text": "so-so", "label": "neg"}]


def tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def minilm(path, seed=0, dropout=None):
    from transformers import AutoModelForSequenceClassification

    set_seed(seed)
    kw = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True, **kw)


@pytest.fixture(scope="module")
def sst2(minilm_dir):
    tok = tokenizer(minilm_dir)
    train_ex, label2id = encode_classification(read_rows(SST2 / "train.tsv", 200), tok, "sentence", "label",
                                               max_length=64)
    dev_ex, _ = encode_classification(read_rows(SST2 / "dev.tsv", 64), tok, "sentence", "label", max_length=64,
                                      label2id=label2id)
    return train_ex, dev_ex


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


def test_lr_schedule():
    assert [lr_factor(s, 10, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 10, 4) == 1.0 and lr_factor(9, 10, 4) == pytest.approx(1 / 6)
    assert lr_factor(7, 10, 4, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(9, 10, 0, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown training argument.*allowed"):
        TrainArgs.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="schedule"):
        TrainArgs.from_dict({"schedule": "step"})


# -- trainer ------------------------------------------------------------------------------------------------------
def test_trainer_lowers_loss_and_changes_only_the_adapter(minilm_dir, sst2, tmp_path):
    train_ex, dev_ex = sst2
    model = minilm(minilm_dir)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    dt.attach(model, dt.LoRA(r=8, alpha=16, modules_to_save=["classifier"]), name="sst2")
    init = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    train_set = eval_loader(train_ex, 50, Collator())
    before = evaluate(model, train_set, "classification")

    args = TrainArgs(lr=3e-3, batch_size=8, max_steps=20, eval_every=10, warmup_steps=2, progress=False)
    result = train(model, train_ex, args, eval_data=dev_ex, output_dir=tmp_path)
    after = evaluate(model, train_set, "classification")
    assert after["eval_loss"] < before["eval_loss"] - 0.03, (before, after)

    for name, p in model.named_parameters():
        if p.requires_grad:  # every adapter and head tensor moved
            assert ".deltas.sst2." in name and not torch.equal(p, init[name]), name
        else:  # the base weights are bit-identical
            assert torch.equal(p, base[name.replace(".base.", ".")]), name
    assert set(init) == {n for n, p in model.named_parameters() if p.requires_grad}

    lines = [json.loads(line) for line in Path(result["metrics_path"]).read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    assert all({"lr", "time", "epoch"} <= set(r) for r in steps) and steps[0]["lr"] == pytest.approx(1.5e-3)
    assert [r["step"] for r in lines if "eval_accuracy" in r] == [10, 20]
    assert result["eval"] == {k: v for k, v in lines[-1].items() if k.startswith("eval_")}
    assert Path(result["plot_path"]).read_bytes()[:4] == b"\x89PNG"

    fresh = dt.load(minilm(minilm_dir, seed=1), result["adapter_path"])  # a differently initialized head
    assert evaluate(fresh, eval_loader(dev_ex, 64, Collator()), "classification") == pytest.approx(result["eval"])


def test_gradient_accumulation_equals_a_larger_batch(minilm_dir, sst2):
    data = sst2[0][:48]
    trained = []
    for batch_size, accum in ((4, 2), (8, 1)):
        model = minilm(minilm_dir, dropout=0.0)
        dt.attach(model, dt.LoRA(r=4, alpha=8, modules_to_save=["classifier"]))
        args = TrainArgs(lr=1e-3, batch_size=batch_size, grad_accum=accum, max_steps=3, shuffle=False,
                         progress=False)
        result = train(model, data, args)
        trained.append(({k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}, result))
    (a, ra), (b, rb) = trained
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    assert [r["loss"] for r in ra["history"]] == pytest.approx([r["loss"] for r in rb["history"]], rel=1e-5)


@dataclass
class CountingLoRA(dt.LoRA):
    """LoRA whose controller records every call (to check that HF's Trainer drives controllers)."""

    name = "counting_lora"

    def controller(self, deltas, model):
        return Counter(model)


class Counter(dt.Controller):
    calls: list = []

    def __init__(self, model):
        self.model = model

    def after_backward(self, info):
        assert all(p.grad is not None for p in self.model.parameters() if p.requires_grad)
        Counter.calls.append(("after_backward", info.step))

    def after_step(self, info):
        assert info.optimizer is not None
        Counter.calls.append(("step", info.step))


def test_hf_trainer_callback_drives_controllers(minilm_dir, sst2, tmp_path):
    from transformers import Trainer, TrainingArguments

    from deltatune.train import DeltatuneCallback

    model = minilm(minilm_dir)
    dt.attach(model, CountingLoRA(r=4, modules_to_save=["classifier"]))
    b0 = {k: d.B.detach().clone() for k, d in dt.deltas(model, "default").items() if hasattr(d, "B")}
    Counter.calls.clear()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=1e-3, report_to="none",
                             save_strategy="no", use_cpu=True, disable_tqdm=True, logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=sst2[0][:32], data_collator=Collator(),
            callbacks=[DeltatuneCallback()]).train()
    assert Counter.calls == [(hook, s) for s in range(3) for hook in ("after_backward", "step")]
    assert all(not torch.equal(d.B, b0[k]) for k, d in dt.deltas(model, "default").items() if k in b0)


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
