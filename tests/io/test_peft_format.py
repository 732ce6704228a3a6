"""PEFT format: export/import, oldest PEFT, refused configs, hostile patterns."""
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
import yaml
from helpers import ROOT, logits, make_minilm, mixed_structures, randomize, state_without
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.cli import main
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


def test_every_structure_exports_to_a_peft_lora_that_matches(minilm_dir, minilm_batch, tmp_path, capsys):
    from peft import PeftModel

    model = mixed_structures(minilm_dir)
    save_file(state_without(make_minilm(minilm_dir)), tmp_path / "base.safetensors")
    for name in ("spiel", "s2ft", "oft"):
        dt.save(model, tmp_path / name, names=[name])
        dt.set_active(model, name)
        ours = logits(model, minilm_batch)
        args = ["export", str(tmp_path / name), "--energy", "1.0", str(tmp_path / f"{name}_peft")]
        if name == "oft":  # a rotation's update depends on the base weight: the checkpoint alone cannot say it
            err = capsys.readouterr().err if main(args) == 2 else "exit 0"
            assert "relative to the base model's weight" in err and "--base" in err
            args += ["--base", str(tmp_path / "base.safetensors")]
        assert main(args) == 0, capsys.readouterr().err
        ref = PeftModel.from_pretrained(make_minilm(minilm_dir), tmp_path / f"{name}_peft").eval()
        torch.testing.assert_close(logits(ref, minilm_batch), ours, atol=1e-4, rtol=0, msg=name)
    # a fixed rank: the truncation's error is reported
    assert main(["export", str(tmp_path / "spiel"), "--rank", "2", str(tmp_path / "r2")]) == 0
    assert "relative error mean" in capsys.readouterr().out
    assert read_record(tmp_path / "r2").modules  # a PEFT checkpoint with rank-2 modules
    cfg = yaml.safe_load((tmp_path / "r2" / "adapter_config.json").read_text())
    assert cfg["r"] == 2
