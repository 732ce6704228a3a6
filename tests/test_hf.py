"""The clients users already run, with real parts: transformers' save_pretrained / Trainer checkpoints and resume,
accelerate's save_state and DDP wrapper, sentence-transformers' trainer, save and load_adapter (issue 15, A)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from helpers import DATA, make_minilm

HERE = Path(__file__).resolve().parent
SST2 = DATA / "glue" / "SST-2"
TEXTS = ["a gripping, beautifully shot film", "dull and far too long", "it was fine"]


def _methods():
    head = {"modules_to_save": ["classifier"]}
    return {"lora": dt.LoRA(r=4, **head),
            "adalora": dt.AdaLoRA(init_r=4, target_r=2, targets=["query", "value"], total_step=10, **head),
            "s2ft": dt.S2FT(**head)}


def _batch(minilm_dir, texts=TEXTS):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    return dict(tok(list(texts), padding=True, return_tensors="pt"))


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _randomize(model, name="default", seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in dt.deltas(model, name).values():
            for p in d.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


def _shared_storages(state: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    seen: dict[int, str] = {}
    shared = []
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            shared.append((seen[ptr], k))
        seen[ptr] = k
    return shared


# -- A1: each tensor once in state_dict ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "adalora", "s2ft"])
def test_state_dict_holds_each_tensor_once(minilm_dir, tmp_path, method):
    from transformers import PreTrainedModel

    model = dt.attach(make_minilm(minilm_dir), _methods()[method])
    state = model.state_dict()
    assert _shared_storages(state) == []
    assert not any("_replacing" in k for k in state)
    # the full-model save (what the Trainer and save_pretrained did before) no longer trips on shared tensors ...
    PreTrainedModel.save_pretrained(model, tmp_path / "full")
    assert set(load_file(tmp_path / "full" / "model.safetensors")) == set(state)
    # ... and the model's own save_pretrained writes its adapter
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()


def test_accelerate_save_state_keeps_every_key(minilm_dir, tmp_path):
    from accelerate import Accelerator

    model = dt.attach(make_minilm(minilm_dir), _methods()["lora"])
    _randomize(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(model)
    accelerator.save_state(tmp_path / "state")
    saved = load_file(tmp_path / "state" / "model.safetensors")
    assert set(saved) == set(state)
    for k, v in state.items():
        assert torch.equal(saved[k], v), k


# -- A2: save_pretrained writes adapters, from_pretrained gives the trained model or an error ------------------------
def test_save_pretrained_writes_an_adapter_that_from_pretrained_loads(minilm_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, PreTrainedModel

    batch = _batch(minilm_dir)
    model = dt.attach(make_minilm(minilm_dir), _methods()["lora"])
    _randomize(model)
    model.save_pretrained(tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(n for n in os.listdir(tmp_path / "lora")
                                                           if not n.startswith(".")) == [
        "adapter_config.json", "adapter_model.safetensors"]  # and the hidden generation manifest
    # transformers loads the base named in the config, then the adapter: the trained model, head included
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lora").eval()
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch))

    # a structure PEFT cannot hold is written in deltatune's format: from_pretrained refuses it, dt.load reads it
    sparse = dt.attach(make_minilm(minilm_dir), dt.SpIEL(density=0.01, targets=["query"],
                                                         modules_to_save=["classifier"]))
    _randomize(sparse)
    sparse.save_pretrained(tmp_path / "spiel")
    assert json.loads((tmp_path / "spiel" / "adapter_config.json").read_text())["format"] == "deltatune"
    with pytest.raises(Exception, match="peft_type"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "spiel")
    fresh = dt.load(make_minilm(minilm_dir, seed=5), tmp_path / "spiel")
    torch.testing.assert_close(_logits(fresh, batch), _logits(sparse, batch))

    dt.unload(model)  # the plain model saves as a plain model again
    assert "save_pretrained" not in model.__dict__
    assert model.save_pretrained.__func__ is PreTrainedModel.save_pretrained


def _sst2_examples(minilm_dir, n):
    from transformers import AutoTokenizer

    from deltatune.train import encode_classification, read_rows

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    examples, _ = encode_classification(read_rows(SST2 / "dev.tsv", n), tok, "sentence", "label", max_length=24)
    return examples, tok.pad_token_id


def _trainer(minilm_dir, examples, pad, out, model):
    from transformers import Trainer, TrainingArguments

    from deltatune.train import Collator, DeltatuneCallback

    args = TrainingArguments(output_dir=str(out), max_steps=8, per_device_train_batch_size=2, learning_rate=1e-3,
                             save_strategy="steps", save_steps=4, logging_strategy="steps", logging_steps=2,
                             report_to="none", use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
    return Trainer(model=model, args=args, train_dataset=examples, data_collator=Collator(pad),
                   callbacks=[DeltatuneCallback()])


def _fresh_lora(minilm_dir):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_dir, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return dt.attach(model, dt.LoRA(r=4, dropout=0.0, modules_to_save=["classifier"]))


def _adapter_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".deltas." in k}


def test_trainer_checkpoints_are_adapters_and_resume_exactly(minilm_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, TrainerState

    from deltatune.train.callback import adapter_checkpoint

    examples, pad = _sst2_examples(minilm_dir, 16)
    batch = _batch(minilm_dir)
    model = _fresh_lora(minilm_dir)
    _trainer(minilm_dir, examples, pad, tmp_path / "run", model).train()
    final = _adapter_state(model)
    for step in (4, 8):
        ckpt = tmp_path / "run" / f"checkpoint-{step}"
        files = set(os.listdir(ckpt))
        assert {"adapter_config.json", "adapter_model.safetensors", "deltatune", "optimizer.pt"} <= files
        assert load_file(ckpt / "model.safetensors") == {}  # no full model under deltatune's names
        assert json.loads((ckpt / "adapter_config.json").read_text())["peft_type"] == "LORA"
    last = tmp_path / "run" / "checkpoint-8"
    model.eval()
    want = _logits(model, batch)
    # dt.load of either copy onto a fresh base, and transformers' from_pretrained, give the trained model
    for folder in (last / "deltatune", last):
        fresh = dt.load(make_minilm(minilm_dir, seed=3), folder)
        torch.testing.assert_close(_logits(fresh, batch), want)
    torch.testing.assert_close(_logits(AutoModelForSequenceClassification.from_pretrained(last).eval(), batch), want)

    # resume from step 4 in a new output folder: the same adapter as the uninterrupted run, bit for bit
    shutil.copytree(tmp_path / "run" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    again = _fresh_lora(minilm_dir)
    _trainer(minilm_dir, examples, pad, tmp_path / "resumed", again).train(
        resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-4"))
    resumed = _adapter_state(again)
    assert resumed.keys() == final.keys()
    for k, v in final.items():
        assert torch.equal(resumed[k], v), k

    # a checkpoint folder that is not the one the Trainer resumed from is refused, not silently used
    state = TrainerState.load_from_json(str(tmp_path / "run" / "checkpoint-4" / "trainer_state.json"))
    state.log_history = [{"loss": 1.0, "step": 2}]
    with pytest.raises(ValueError, match="not the checkpoint the Trainer resumed from"):
        adapter_checkpoint(type("A", (), {"output_dir": str(tmp_path / "run")})(), state)


def test_trainer_load_best_model_at_end_loads_the_best_adapter(minilm_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    from deltatune.train import Collator, DeltatuneCallback

    examples, pad = _sst2_examples(minilm_dir, 8)
    model = _fresh_lora(minilm_dir)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
                             eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                             load_best_model_at_end=True, metric_for_best_model="eval_loss", report_to="none",
                             use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=examples, eval_dataset=examples[:4],
                      data_collator=Collator(pad), callbacks=[DeltatuneCallback()])
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    saved = load_file(best / "deltatune" / "adapter_model.safetensors")
    for mod, d in dt.deltas(model, "default").items():
        for k, v in d.tensors().items():
            assert torch.equal(v, saved[f"{mod}.{k}"]), f"{mod}.{k}"


# -- A4: AdaLoRA in a user's own accelerate / DDP loop ---------------------------------------------------------------
def test_adalora_in_a_users_accelerate_ddp_loop(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "clients_ddp_worker.py"), "--data", str(SST2 / "train.tsv"), "--out", str(tmp_path),
           "--steps", "6"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    results = [json.loads((tmp_path / f"rank{r}" / "result.json").read_text()) for r in (0, 1)]
    for res in results:
        assert res["world"] == 2 and res["wrapper"] == "DistributedDataParallel"
        assert "resizable" in res["refused"] and "DistributedDataParallel" in res["refused"]
        assert len(res["notices"]) == 1 and "cannot change shape" in res["notices"][0]
        assert not any(res["changed"])  # shapes stayed fixed: pruned triplets are masked
    assert results[0]["ranks"] == results[1]["ranks"]
    assert sum(results[0]["ranks"].values()) == 2 * len(results[0]["ranks"])  # pruned to the target budget
    ranks = [load_file(tmp_path / f"rank{r}" / "adapter_model.safetensors") for r in (0, 1)]
    for k, v in ranks[0].items():
        assert torch.equal(v, ranks[1][k]), k


# -- A8: sentence-transformers -----------------------------------------------------------------------------------------
def _sts_pairs(n):
    from deltatune.train import read_rows

    rows = read_rows(DATA / "glue" / "STS-B" / "train.tsv", n)
    return {"sentence1": [r["sentence1"] for r in rows], "sentence2": [r["sentence2"] for r in rows],
            "score": [float(r["score"]) / 5.0 for r in rows]}


def test_sentence_transformer_adapters_train_save_and_reload(minilm_dir, tmp_path):
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss

    from deltatune.train import DeltatuneCallback

    st = SentenceTransformer(str(minilm_dir), device="cpu")
    before = st.encode(TEXTS, convert_to_tensor=True)
    dt.attach(st, dt.LoRA(r=4, targets=["query", "value"], dropout=0.0))
    names = list(dt.deltas(st, "default"))
    assert names and all(n.startswith("encoder.layer.") for n in names)  # the transformers model's own names

    args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3,
                                                per_device_train_batch_size=4, learning_rate=5e-3,
                                                save_strategy="steps", save_steps=3, report_to="none",
                                                use_cpu=True, disable_tqdm=True, seed=0)
    SentenceTransformerTrainer(model=st, args=args, train_dataset=Dataset.from_dict(_sts_pairs(12)),
                               loss=CosineSimilarityLoss(st), callbacks=[DeltatuneCallback()]).train()
    st.eval()
    trained = st.encode(TEXTS, convert_to_tensor=True)
    assert (trained - before).abs().max() > 1e-4  # the adapter trained

    st.save(str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    for folder in (tmp_path / "saved", tmp_path / "run" / "checkpoint-3"):
        reloaded = SentenceTransformer(str(folder), device="cpu")
        torch.testing.assert_close(reloaded.encode(TEXTS, convert_to_tensor=True), trained)

    dt.save(st, tmp_path / "peft", format="peft")
    plain = SentenceTransformer(str(minilm_dir), device="cpu")
    plain.load_adapter(str(tmp_path / "peft"))
    torch.testing.assert_close(plain.encode(TEXTS, convert_to_tensor=True), trained)
    # and dt.load onto a SentenceTransformer reads either checkpoint
    again = dt.load(SentenceTransformer(str(minilm_dir), device="cpu"), tmp_path / "run" / "checkpoint-3" / "deltatune")
    torch.testing.assert_close(again.encode(TEXTS, convert_to_tensor=True), trained)
