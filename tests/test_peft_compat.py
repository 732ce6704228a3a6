"""PEFT interop beyond the numerics (issue 15, A5 A6 B1 B6 B8): exports that the oldest and the newest supported
PEFT load to the same logits, imports that refuse what is not a plain LoRA (naming file and key) and weights
torn from their config, bounded regexes, and PEFT's argument names and habits."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, logits, make_minilm, randomize
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.io import read_record
from deltatune.io.peft_format import EXPORT_KEYS, LORA_KEYS

peft = pytest.importorskip("peft")

HERE = Path(__file__).resolve().parent
#: the oldest transformers + PEFT pair we claim, installed by .ci/run (pip install --target)
OLDEST = Path(os.environ.get("DELTATUNE_OLD_PEFT", ROOT / ".ci" / "peft-oldest"))


def _rich_lora(minilm_dir):
    """A LoRA using every exported feature: rank_pattern, alpha_pattern, modules_to_save, an embedding LoRA."""
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.LoRA(r=8, alpha=16, targets=["query", "value", "word_embeddings"],
                             modules_to_save=["classifier"],
                             rank_pattern={"layer.1.attention.self.query": 2, "word_embeddings": 4},
                             alpha_pattern={"value": 5}), name="x")
    randomize(model, "x", std=0.05)
    return model


@pytest.fixture(scope="module")
def rich_export(minilm_dir, minilm_batch, tmp_path_factory):
    model = _rich_lora(minilm_dir)
    path = tmp_path_factory.mktemp("peft") / "rich"
    dt.save(model, path, format="peft")
    return path, logits(model, minilm_batch)


# -- A5: exports every supported PEFT loads -------------------------------------------------------------------
def test_export_writes_only_the_keys_the_adapter_needs(rich_export):
    import dataclasses

    cfg = json.loads((rich_export[0] / "adapter_config.json").read_text())
    assert set(cfg) == set(EXPORT_KEYS)
    assert "alora_invocation_tokens" not in cfg and "peft_version" not in cfg
    assert set(cfg) <= {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert cfg["rank_pattern"] == {"bert.embeddings.word_embeddings": 4, "bert.encoder.layer.1.attention.self.query": 2}


def test_export_loads_in_the_newest_peft_both_ways(rich_export, minilm_dir, minilm_batch):
    path, expected = rich_export
    torch.manual_seed(7)
    ref = peft.PeftModel.from_pretrained(make_minilm(minilm_dir, seed=7), path).eval()
    torch.testing.assert_close(logits(ref, minilm_batch), expected, atol=1e-5, rtol=0)
    hf = make_minilm(minilm_dir, seed=7)
    hf.load_adapter(str(path))  # transformers' own PEFT integration
    torch.testing.assert_close(logits(hf.eval(), minilm_batch), expected, atol=1e-5, rtol=0)


@pytest.mark.skipif(not (OLDEST / "peft").is_dir(),
                    reason=f"the oldest supported transformers + PEFT are not installed in {OLDEST} (.ci/run installs "
                           "them with pip install --target)")
def test_export_loads_in_the_oldest_peft(rich_export, minilm_dir, minilm_batch, tmp_path):
    path, expected = rich_export
    save_file({k: v.contiguous() for k, v in minilm_batch.items()}, str(tmp_path / "inputs.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(OLDEST), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(HERE / "peft_old_worker.py"), str(minilm_dir), str(path),
                          str(tmp_path / "inputs.safetensors"), str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["peft"] == "0.13.2" and info["transformers"].startswith("4.45") and info["torch"] == torch.__version__
    assert not [w for w in info["warnings"] if "nexpected" in w], info["warnings"]
    for way in ("peft", "hf"):  # PeftModel.from_pretrained and transformers' load_adapter
        torch.testing.assert_close(load_file(str(tmp_path / f"{way}.safetensors"))["logits"], expected, atol=1e-5,
                                   rtol=0)


# -- B1: weights and config from different saves --------------------------------------------------------------
def test_torn_peft_checkpoint_is_refused(rich_export, minilm_dir, minilm_batch, tmp_path):
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.LoRA(r=4, alpha=16, targets=["query", "value", "word_embeddings"],
                             modules_to_save=["classifier"]), name="x")
    dt.save(model, tmp_path / "other", format="peft")
    torn = tmp_path / "torn"
    shutil.copytree(rich_export[0], torn)
    shutil.copy(tmp_path / "other" / "adapter_config.json", torn / "adapter_config.json")  # new config, old weights
    fresh = make_minilm(minilm_dir)
    with pytest.raises(ValueError, match=r"torn/adapter_config.json: module 'bert\.\S+' has LoRA tensors .* rank 4"):
        dt.load(fresh, torn)
    assert dt.adapters(fresh) == []
    # a rank_pattern entry lost from the config is caught too
    cfg = json.loads((rich_export[0] / "adapter_config.json").read_text())
    del cfg["rank_pattern"]["bert.encoder.layer.1.attention.self.query"]
    (torn / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"layer\.1\.attention\.self\.query' has LoRA tensors A \(2, 384\).* rank 8"):
        dt.load(fresh, torn)


# -- B6: PEFT checkpoints that are not plain LoRA ---------------------------------------------------------------
@pytest.mark.parametrize("key,value", [
    ("alora_invocation_tokens", [101, 2023]), ("layer_replication", [[0, 4], [2, 6]]), ("bias", "all"),
    ("use_dora", True), ("lora_bias", True), ("trainable_token_indices", [5, 6]), ("target_parameters", ["w"]),
    ("use_qalora", True), ("megatron_config", {"tp": 2}), ("init_lora_weights", "pissa_niter_4"),
    ("init_lora_weights", "olora"), ("some_future_feature", {"on": True}),
])
def test_peft_configs_that_are_not_plain_lora_are_refused(rich_export, minilm_dir, tmp_path, key, value):
    folder = tmp_path / "variant"
    shutil.copytree(rich_export[0], folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
    fresh = make_minilm(minilm_dir)
    with pytest.raises(ValueError, match=rf"variant/adapter_config.json: PEFT config key '{key}' = .* not supported"):
        dt.load(fresh, folder)
    assert dt.adapters(fresh) == []


def test_real_peft_bias_lora_only_checkpoint_is_refused(minilm_dir, tmp_path):
    ref = peft.get_peft_model(make_minilm(minilm_dir), peft.LoraConfig(r=4, target_modules=["query"],
                                                                      bias="lora_only"))
    ref.save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="'bias' = 'lora_only' is not supported"):
        dt.load(make_minilm(minilm_dir), tmp_path / "b")


def test_keys_that_do_not_change_the_saved_lora_are_accepted(rich_export, minilm_dir, minilm_batch, tmp_path):
    import dataclasses

    # every key of the installed PEFT's LoraConfig has a rule
    assert {f.name for f in dataclasses.fields(peft.LoraConfig)} <= set(LORA_KEYS)
    folder = tmp_path / "extra"
    shutil.copytree(rich_export[0], folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(init_lora_weights="gaussian", layers_to_transform=[0, 1, 2, 3, 4, 5], exclude_modules=["key"],
               peft_version="0.21.2", alora_invocation_tokens=None, use_dora=False, loftq_config={})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    fresh = dt.load(make_minilm(minilm_dir), folder)
    torch.testing.assert_close(logits(fresh, minilm_batch), rich_export[1], atol=1e-5, rtol=0)


# -- B8: regexes from checkpoints and users never run unbounded ----------------------------------------------
HOSTILE = r"(.|\w)+\d{2}"  # overlapping alternatives under + : exponential backtracking on every module name


def test_hostile_checkpoint_pattern_fails_fast(rich_export, minilm_dir, tmp_path):
    for i, key in enumerate([r"(.+)+Z", HOSTILE]):  # the pattern and one that defeats regex's shortcuts
        folder = tmp_path / f"hostile{i}"
        shutil.copytree(rich_export[0], folder)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["alpha_pattern"] = {key: 3, **cfg["alpha_pattern"]}
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        model = make_minilm(minilm_dir)
        start = time.monotonic()  # reading the checkpoint is where its patterns run
        if i == 0:
            read_record(folder, model=model)  # matches nothing, quickly (Python's re takes hours on it)
        else:
            with pytest.raises(ValueError, match=r"hostile1/adapter_config.json: alpha_pattern key .* did not finish"):
                read_record(folder, model=model)
        assert time.monotonic() - start < 1.0
        if i == 0:
            dt.load(model, folder)
        else:
            with pytest.raises(ValueError, match="did not finish"):
                dt.load(model, folder)


def test_hostile_user_patterns_fail_fast(minilm_dir):
    model = make_minilm(minilm_dir)
    for method in (dt.LoRA(targets=HOSTILE), dt.LoRA(targets=["query"], exclude=HOSTILE),
                   dt.LoRA(targets=["query"], rank_pattern={HOSTILE: 2})):
        start = time.monotonic()
        with pytest.raises(ValueError, match="did not finish matching module name"):
            dt.attach(model, method)
        assert time.monotonic() - start < 1.0
    assert dt.adapters(model) == []


def test_literal_pattern_keys_are_not_regexes():
    from deltatune.targets import name_matches

    assert name_matches("bert.encoder.layer.1.attention.self.query", "layer.1.attention.self.query")
    assert not name_matches("bert.encoder.layer_1.attention.self.query", "layer.1.attention.self.query")
    assert name_matches("bert.encoder.layer.1.attention.self.query", r"layer\.\d\.attention\.self\.query")
    assert not name_matches("bert.encoder.layer.1.attention.self.query", "uery")


# -- A6: PEFT's habits ------------------------------------------------------------------------------------------
def test_peft_argument_names_mean_the_same():
    assert dt.LoRA(lora_alpha=16, target_modules=["query"], lora_dropout=0.1, exclude_modules=["x"],
                   layers_to_transform=[0]) == \
        dt.LoRA(alpha=16, targets=["query"], dropout=0.1, exclude=["x"], layers=[0])
    ada = dt.AdaLoRA(init_r=6, target_r=4, tinit=2, tfinal=3, deltaT=1, target_modules=["query"])
    assert (ada.t_init, ada.t_final, ada.delta_t, ada.targets) == (2, 3, 1, ["query"])
    with pytest.raises(TypeError, match=r"'alpah'; did you mean alpha=\?"):
        dt.LoRA(alpah=16)
    with pytest.raises(TypeError, match=r"LoRA\(\) got 'alpha' twice"):
        dt.LoRA(alpha=8, lora_alpha=16)
    with pytest.raises(TypeError, match="'init_lora_weights'; use init="):
        dt.LoRA(init_lora_weights="gaussian")
    with pytest.raises(TypeError, match="OFT.* unexpected argument 'lora_alpha'"):
        dt.OFT(lora_alpha=16)
    # records keep working: from_dict reads PEFT names too
    assert dt.Method.from_dict({"method": "lora", "lora_alpha": 4}).alpha == 4


def test_layers_to_transform_restricts_targets(minilm_dir):
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.LoRA(target_modules=["query", "value"], layers_to_transform=[0, 2]))
    assert sorted(dt.deltas(model, "default")) == [f"bert.encoder.layer.{i}.attention.self.{m}"
                                                   for i in (0, 2) for m in ("query", "value")]
    with pytest.raises(ValueError, match=r"layers=\[99\] keeps none .* indices are \[0, 1, 2, 3, 4, 5\]"):
        dt.attach(model, dt.LoRA(targets=["query"], layers=[99]), name="y")


def test_print_trainable_parameters_matches_peft(minilm_dir, capsys):
    ours = make_minilm(minilm_dir)
    dt.attach(ours, dt.LoRA(r=8, targets=["query", "value"]))
    counts = dt.print_trainable_parameters(ours)
    line = capsys.readouterr().out.strip()
    ref = peft.get_peft_model(make_minilm(minilm_dir), peft.LoraConfig(r=8, target_modules=["query", "value"]))
    ref.print_trainable_parameters()
    assert line == capsys.readouterr().out.strip()
    assert line.startswith(f"trainable params: {counts[0]:,d} || all params: {counts[1]:,d} || trainable%: ")


def test_load_is_trainable(rich_export, minilm_dir):
    frozen = dt.load(make_minilm(minilm_dir), rich_export[0], is_trainable=False)
    assert dt.active_adapters(frozen) == ["default"]
    assert dt.trainable_parameters(frozen)[0] == 0
    trained = dt.load(make_minilm(minilm_dir), rich_export[0])  # deltatune's default: ready to train on
    assert all(p.requires_grad for d in dt.deltas(trained, "default").values() for p in d.parameters())


def test_conv1d_export_sets_fan_in_fan_out_and_loads_in_peft(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():  # a small GPT-2 (Conv1D layers), seeded: the same base weights each time
        torch.manual_seed(3)
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32)).eval()

    ours = gpt2()
    dt.attach(ours, dt.LoRA(r=4, alpha=8, targets=["c_attn", "c_proj"], rank_pattern={"h.1.attn.c_attn": 2}))
    randomize(ours, "default", std=0.1)
    dt.save(ours, tmp_path / "g", format="peft")
    cfg = json.loads((tmp_path / "g" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    ids = {"input_ids": torch.arange(20).reshape(2, 10)}
    ref = peft.PeftModel.from_pretrained(gpt2(), tmp_path / "g").eval()
    torch.testing.assert_close(logits(ref, ids), logits(ours, ids), atol=1e-5, rtol=0)
    back = dt.load(gpt2(), tmp_path / "g")  # and back: fan_in_fan_out does not change the A / B layout
    torch.testing.assert_close(logits(back, ids), logits(ours, ids), atol=1e-5, rtol=0)
