"""Extracting adapters from fine-tuned weights."""
from __future__ import annotations

import pytest
import torch
from helpers import logits, make_minilm, randomize, state_without
from safetensors.torch import save_file

import deltatune as dt
from deltatune.cli import main


HEAD = "classifier"


@pytest.fixture
def fine_tune(minilm_dir, tmp_path):
    """A base checkpoint without a head, and a 'full fine-tune' = base + a rank-3 LoRA + a new head."""
    lora = make_minilm(minilm_dir)
    dt.attach(lora, dt.LoRA(r=3, alpha=6, targets=["query", "value", "intermediate.dense"]), name="x")
    randomize(lora, "x", std=0.05)
    dWs = {mod: d.dense().detach() for mod, d in dt.deltas(lora, "x").items()}
    tuned = make_minilm(minilm_dir)
    with torch.no_grad():
        for mod, dW in dWs.items():
            tuned.get_submodule(mod).weight += dW
        tuned.classifier.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
    save_file(state_without(make_minilm(minilm_dir), drop=[HEAD]), tmp_path / "base.safetensors")
    save_file(state_without(tuned), tmp_path / "tuned.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", dWs, tuned


def test_extraction_recovers_a_rank_r_update_exactly_and_loads_in_peft(fine_tune, minilm_dir, minilm_batch,
                                                                        tmp_path):
    from peft import PeftModel

    base, tuned_path, dWs, tuned = fine_tune
    record, report = dt.extract(base, tuned_path, rank=3)
    assert set(report.ranks) == set(dWs) and set(report.ranks.values()) == {3}
    assert max(report.errors.values()) < 1e-3
    assert report.kept_whole == [HEAD]  # the base has no head: it is kept whole (modules_to_save)
    assert report.unchanged == 6 * 6 + 3 + 1 - len(dWs)  # 6 matrices a block, 3 embeddings, the pooler
    for mod, dW in dWs.items():
        t = record.tensors[mod]
        torch.testing.assert_close(t["B"] @ t["A"], dW, atol=2e-6, rtol=1e-4)
    # the energy threshold finds the rank itself; a lower rank is worse
    _, by_energy = dt.extract(base, tuned_path, energy=0.999)
    assert set(by_energy.ranks.values()) == {3}
    _, low = dt.extract(base, tuned_path, rank=1)
    assert min(low.errors.values()) > 0.1
    # the CLI writes a PEFT checkpoint; PEFT on the base reproduces the fine-tuned model
    assert main(["extract", str(base), str(tuned_path), str(tmp_path / "lora"), "--rank", "3"]) == 0
    ref = PeftModel.from_pretrained(make_minilm(minilm_dir, seed=3), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(ref, minilm_batch), logits(tuned, minilm_batch), atol=1e-4, rtol=0)


def test_extraction_reports_what_it_cannot_extract_and_refuses_bad_input(fine_tune, minilm_dir, tmp_path, capsys):
    base, tuned_path, dWs, tuned = fine_tune
    state = state_without(tuned)
    ln = "bert.encoder.layer.0.output.LayerNorm.weight"
    state[ln] = state[ln] * 1.1
    save_file(state, tmp_path / "tuned_ln.safetensors")
    _, report = dt.extract(base, tmp_path / "tuned_ln.safetensors", rank=3, targets=["query"])
    assert set(report.ranks) == {m for m in dWs if m.endswith("query")}  # targets select modules
    assert report.skipped == {} and report.kept_whole == []  # the LayerNorm and head are not targets
    _, report = dt.extract(base, tmp_path / "tuned_ln.safetensors", rank=3)
    assert list(report.skipped) == [ln] and abs(report.skipped[ln] - 0.1) < 1e-4
    assert "changed but not a weight matrix" in report.summary()
    with pytest.raises(ValueError, match="give rank"):
        dt.extract(base, tuned_path)
    with pytest.raises(ValueError, match="nothing to extract"):
        dt.extract(base, base, rank=2)
    emb = "bert.embeddings.word_embeddings.weight"  # a fine-tune that added tokens: the table is resized
    state[emb] = torch.cat([state[emb], torch.zeros(2, state[emb].shape[1])])
    save_file(state, tmp_path / "resized.safetensors")
    _, report = dt.extract(base, tmp_path / "resized.safetensors", rank=3)
    assert report.resized == [emb] and set(report.ranks) == set(dWs) and "resized" in report.summary()
    save_file({"encoder.x.weight": torch.ones(3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a base model and its fine-tune"):
        dt.extract(base, tmp_path / "other.safetensors", rank=2)
    assert main(["extract", str(base), str(tmp_path / "missing"), str(tmp_path / "o"), "--rank", "2"]) == 2
    assert "no such safetensors file" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        dt.extract(base, tmp_path / "junk.safetensors", rank=2)


def test_extraction_reads_layer_kinds_from_the_config_and_tolerates_prefixes(tmp_path):
    """GPT-2: Conv1D weights are stored (in x out) and the token table is an embedding; the base is saved as the
    bare GPT2Model (no 'transformer.' prefix, no head)."""
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    tuned = GPT2LMHeadModel(config).eval()
    tuned.transformer.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "start")
    dt.attach(tuned, dt.LoRA(r=2, targets=["c_attn", "mlp.c_proj", "wte"]), name="x")
    randomize(tuned, "x", std=0.1)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tuned(ids).logits
    dt.unload(tuned, merge=True).save_pretrained(tmp_path / "tuned")
    record, report = dt.extract(tmp_path / "base", tmp_path / "tuned", rank=2)
    assert {spec["layer"] for spec in record.modules.values()} == {"conv1d", "embedding", "linear"}
    assert report.kept_whole == ["lm_head"] and max(report.errors.values()) < 1e-3
    assert set(report.ranks) == {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_proj")} \
        | {"transformer.wte"}
    dt.io.write_record(tmp_path / "lora", record, format="peft")
    ref = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "start"), tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, want, atol=1e-4, rtol=0)
