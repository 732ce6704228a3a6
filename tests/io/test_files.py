"""Checkpoints on real files: own format, several adapters, residual inits as plain LoRA, bad bases, atomicity."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import logits, make_minilm, randomize

import deltatune as dt
from deltatune import files as F


def test_save_load_identical_outputs(minilm_dir, minilm_batch, tmp_path):
    model = make_minilm(minilm_dir, seed=0)
    dt.attach(model, dt.LoRA(r=8, alpha=16, targets="all-linear", modules_to_save=["classifier"]), name="sst2")
    randomize(model, "sst2")
    y = logits(model, minilm_batch)
    out = dt.save(model, tmp_path / "sst2")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["format"] == "deltatune" and cfg["name"] == "sst2" and cfg["method"]["method"] == "lora"
    assert cfg["modules"]["classifier"]["structure"] == "full"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    fresh = make_minilm(minilm_dir, seed=123)  # a differently initialized head: the saved head must win
    assert not torch.allclose(logits(fresh, minilm_batch), y)
    dt.load(fresh, out)
    assert dt.adapters(fresh) == ["sst2"]
    assert torch.equal(logits(fresh, minilm_batch), y)
    # the loaded adapter keeps training
    assert dt.trainable_parameters(fresh)[0] == dt.trainable_parameters(model)[0]


def test_several_adapters_by_name(minilm_dir, minilm_batch, tmp_path):
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.LoRA(r=4, targets=["query", "value"]), name="a")
    dt.attach(model, dt.LoRA(r=2, alpha=8, targets=["dense"]), name="b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    ys = {}
    for n in ("a", "b"):
        dt.set_active(model, n)
        ys[n] = logits(model, minilm_batch)
    dt.save(model, tmp_path / "both")
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == [F.MANIFEST_NAME, "a", "b"]
    fresh = make_minilm(minilm_dir)
    dt.load(fresh, tmp_path / "both")
    assert dt.adapters(fresh) == ["a", "b"]
    for n in ("a", "b"):
        dt.set_active(fresh, n)
        assert torch.equal(logits(fresh, minilm_batch), ys[n])
    # one adapter by name, renamed on load
    dt.save(model, tmp_path / "only_b", names="b")
    other = make_minilm(minilm_dir)
    dt.load(other, tmp_path / "only_b", name="bee")
    assert dt.adapters(other) == ["bee"]
    assert torch.equal(logits(other, minilm_batch), ys["b"])


@pytest.mark.parametrize("method", [dt.PiSSA(r=4, alpha=8), dt.MiLoRA(r=4), dt.OLoRA(r=4, use_rslora=True)],
                         ids=["pissa", "milora", "olora-rslora"])
def test_residual_init_saves_as_plain_lora_on_the_original_base(minilm_dir, minilm_batch, tmp_path, method):
    model = make_minilm(minilm_dir)
    dt.attach(model, method.__class__(**{**method.__dict__, "targets": ["query", "value"]}), name="res")
    d = dt.deltas(model, "res")["bert.encoder.layer.0.attention.self.query"]
    with torch.no_grad():  # "train": move the trainable factors away from the anchor
        d.A.add_(0.05 * torch.randn_like(d.A))
        d.B.add_(0.05 * torch.randn_like(d.B))
    y = logits(model, minilm_batch)
    dt.save(model, tmp_path / "res")
    cfg = json.loads((tmp_path / "res" / "adapter_config.json").read_text())
    assert cfg["modules"]["bert.encoder.layer.0.attention.self.query"]["r"] == 8  # rank 2r
    dt.save(model, tmp_path / "res-peft", format="peft")
    pcfg = json.loads((tmp_path / "res-peft" / "adapter_config.json").read_text())
    alpha = method.alpha if method.alpha is not None else method.r
    assert pcfg["r"] == 8
    assert pcfg["lora_alpha"] == pytest.approx(alpha * (2 ** 0.5 if method.use_rslora else 2))
    for folder in ("res", "res-peft"):
        fresh = make_minilm(minilm_dir)
        dt.load(fresh, tmp_path / folder)
        torch.testing.assert_close(logits(fresh, minilm_batch), y, atol=1e-5, rtol=0)


def _weights_and_types(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def test_refuses_to_load_onto_a_base_it_does_not_fit(minilm_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = make_minilm(minilm_dir)
    dt.attach(model, dt.LoRA(r=4, targets=["query"]), name="a")
    dt.save(model, tmp_path / "a")

    gpt = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    before = _weights_and_types(gpt)
    with pytest.raises(ValueError, match=r"does not fit.*'bert\.encoder\.layer\.0\.attention\.self\.query'"):
        dt.load(gpt, tmp_path / "a")
    assert dt.adapters(gpt) == []
    assert _weights_and_types(gpt)[1] == before[1]

    # same names, wrong shapes (a MiniLM with a smaller hidden size)
    from transformers import BertConfig, BertForSequenceClassification

    small = BertForSequenceClassification(BertConfig(hidden_size=192, num_hidden_layers=6, num_attention_heads=12,
                                                     intermediate_size=768, vocab_size=30522))
    with pytest.raises(ValueError, match=r"\(out, in\) = \(192, 192\).*\(384, 384\)"):
        dt.load(small, tmp_path / "a")
    assert dt.adapters(small) == []

    # a name clash is refused before anything is attached
    with pytest.raises(ValueError, match="already attached"):
        dt.load(model, tmp_path / "a")


def test_atomic_write_keeps_the_old_checkpoint_on_failure(minilm_dir, minilm_batch, tmp_path, monkeypatch):
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.LoRA(r=4, targets=["query"]), name="a")
    randomize(model, "a")
    dt.save(model, tmp_path / "a")
    good = (tmp_path / "a" / F.WEIGHTS_NAME).read_bytes()
    randomize(model, "a", seed=5)

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(F, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        dt.save(model, tmp_path / "a")
    assert (tmp_path / "a" / F.WEIGHTS_NAME).read_bytes() == good
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [F.MANIFEST_NAME, F.CONFIG_NAME, F.WEIGHTS_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no staging folder left


def test_missing_files_give_clear_errors(minilm_dir, tmp_path):
    model = make_minilm(minilm_dir)
    with pytest.raises(FileNotFoundError, match="no adapter found"):
        dt.load(model, tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / F.CONFIG_NAME).write_text("{}")
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        dt.load(model, tmp_path / "x")
    with pytest.raises(ValueError, match="unknown format"):
        dt.attach(model, dt.LoRA(r=2, targets=["query"]))
        dt.save(model, tmp_path / "y", format="onnx")
